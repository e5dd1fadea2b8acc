//! SMART scope arithmetic: what an institution asks for ∩ what the directory allows.

/// Permissions of a scope's suffix as a set over `cruds` (v1 `read` = rs, `write` = cud).
fn permissions(suffix: &str) -> Option<String> {
    match suffix {
        "*" => Some("cruds".into()),
        "read" => Some("rs".into()),
        "write" => Some("cud".into()),
        v2 if !v2.is_empty() && v2.chars().all(|c| "cruds".contains(c)) => {
            Some("cruds".chars().filter(|c| v2.contains(*c)).collect())
        }
        _ => None,
    }
}

/// (context, resource, permissions in cruds order)
fn split(scope: &str) -> Option<(&str, &str, String)> {
    let (context, rest) = scope.split_once('/')?;
    let (resource, suffix) = rest.split_once('.')?;
    Some((context, resource, permissions(suffix)?))
}

/// The scopes granted for `requested` given the directory's `allowed` scopes, in SMART v2
/// form (`system/Patient.rs`). A requested scope is narrowed to what some allowed scope
/// covers; a wildcard request (`system/*.rs`) yields the allowed resources it covers.
/// Scopes that are not SMART resource scopes are ignored.
pub fn intersect(requested: &[&str], allowed: &[String]) -> Vec<String> {
    let mut granted: Vec<String> = Vec::new();
    for req in requested {
        let Some((ctx, res, perms)) = split(req) else {
            continue;
        };
        for allow in allowed {
            let Some((actx, ares, aperms)) = split(allow) else {
                continue;
            };
            if ctx != actx {
                continue;
            }
            let resource = if ares == "*" {
                res
            } else if res == "*" || res == ares {
                ares
            } else {
                continue;
            };
            let common: String = perms.chars().filter(|c| aperms.contains(*c)).collect();
            if common.is_empty() {
                continue;
            }
            merge(&mut granted, &format!("{ctx}/{resource}"), &common);
        }
    }
    granted
}

/// Add `perms` to the entry for `prefix` (union), keeping cruds order.
fn merge(granted: &mut Vec<String>, prefix: &str, perms: &str) {
    if let Some(existing) = granted
        .iter_mut()
        .find(|g| g.rsplit_once('.').is_some_and(|(p, _)| p == prefix))
    {
        let old = existing.rsplit_once('.').map(|(_, p)| p.to_string());
        let old = old.unwrap_or_default();
        let union: String = "cruds"
            .chars()
            .filter(|c| old.contains(*c) || perms.contains(*c))
            .collect();
        *existing = format!("{prefix}.{union}");
    } else {
        granted.push(format!("{prefix}.{perms}"));
    }
}

#[cfg(test)]
mod tests {
    use super::intersect;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn only_the_intersection_is_granted() {
        let allowed = s(&[
            "system/Patient.rs",
            "system/Consent.cruds",
            "system/Observation.read",
        ]);
        assert_eq!(
            intersect(
                &[
                    "system/Patient.cruds",
                    "system/Consent.rs",
                    "system/AuditEvent.rs"
                ],
                &allowed
            ),
            s(&["system/Patient.rs", "system/Consent.rs"])
        );
        assert_eq!(
            intersect(&["system/Observation.rs"], &allowed),
            s(&["system/Observation.rs"])
        );
        assert!(intersect(&["system/AuditEvent.rs"], &allowed).is_empty());
        assert!(intersect(&["user/Patient.rs"], &allowed).is_empty());
        assert!(intersect(&["garbage", "system/Patient.x"], &allowed).is_empty());
    }

    #[test]
    fn wildcards_on_either_side() {
        let allowed = s(&["system/Patient.rs", "system/Observation.r"]);
        assert_eq!(
            intersect(&["system/*.read"], &allowed),
            s(&["system/Patient.rs", "system/Observation.r"])
        );
        let all = s(&["system/*.rs"]);
        assert_eq!(
            intersect(&["system/DocumentReference.rs"], &all),
            s(&["system/DocumentReference.rs"])
        );
    }
}
