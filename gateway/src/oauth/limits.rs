//! State the replicas must share: the `jti` replay cache and the rate limits (token endpoint,
//! logins, API calls per access token and institution, public directory reads per address).
//!
//! With `redis.url` set, both live in Redis (one view for every replica): the replay cache is
//! `SET key 1 NX EX ttl`; rate limits are GCRA in a Lua script (atomic, Redis clock), several
//! budgets of one request in one script call (all or nothing, one round trip). Without Redis
//! they are in-process (a map with expiry; keyed `governor` limiters, idle keys pruned) —
//! correct for one node. When Redis is configured but unreachable, a rate-limited request
//! fails closed (503).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use redis::aio::ConnectionManager;
use tokio::sync::OnceCell;

use crate::config::RateLimit;

type Limiter = DefaultKeyedRateLimiter<String, StateInformationMiddleware>;

/// In-process checks between two prunings of idle keys (keys whose bucket is full again).
const PRUNE_EVERY: u64 = 4096;

/// Outcome of a rate-limit check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed { limit: u32, remaining: u32 },
    Limited { limit: u32, retry_after_secs: u64 },
}

/// One budget a request spends from: the bucket `scope:key` with `limit`.
#[derive(Debug, Clone, Copy)]
pub struct Budget<'a> {
    pub scope: &'a str,
    pub key: &'a str,
    pub limit: RateLimit,
}

/// GCRA over KEYS[1..n]; ARGV[2i-1] = emission interval (ms) and ARGV[2i] = burst of KEYS[i].
/// All or nothing: a cell is taken from every bucket only when every bucket has one.
/// Returns {allowed (0/1), retry after (ms), remaining, index of the deciding key (1-based)}:
/// the refusing key, or the one with the least remaining.
const GCRA_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local tats = {}
local least, which = nil, 1
for i = 1, #KEYS do
  local emission = tonumber(ARGV[2 * i - 1])
  local burst = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  local new_tat = tat + emission
  local allow_at = new_tat - emission * burst
  if now < allow_at then
    return {0, allow_at - now, 0, i}
  end
  tats[i] = new_tat
  local remaining = math.floor((now - allow_at) / emission)
  if least == nil or remaining < least then least, which = remaining, i end
end
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], tats[i], 'PX', math.ceil(tats[i] - now))
end
return {1, 0, least or 0, which}
";

pub struct SharedLimits {
    redis: Option<redis::Client>,
    conn: OnceCell<ConnectionManager>,
    prefix: String,
    timeout: Duration,
    script: redis::Script,
    seen: Mutex<HashMap<String, i64>>,
    /// One keyed limiter per (scope, limit); keys are the bucket names.
    limiters: Mutex<HashMap<(String, RateLimit), Arc<Limiter>>>,
    checks: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
#[error("shared state unavailable: {0}")]
pub struct Unavailable(pub String);

impl SharedLimits {
    pub fn new(redis: Option<redis::Client>, prefix: &str, timeout: Duration) -> SharedLimits {
        SharedLimits {
            redis,
            conn: OnceCell::new(),
            prefix: prefix.to_string(),
            timeout,
            script: redis::Script::new(GCRA_LUA),
            seen: Mutex::new(HashMap::new()),
            limiters: Mutex::new(HashMap::new()),
            checks: AtomicU64::new(0),
        }
    }

    async fn connection(&self) -> Result<Option<ConnectionManager>, Unavailable> {
        let Some(client) = &self.redis else {
            return Ok(None);
        };
        let conn = self
            .conn
            .get_or_try_init(|| async {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(self.timeout)
                    .set_response_timeout(self.timeout)
                    .set_number_of_retries(1);
                tokio::time::timeout(
                    self.timeout,
                    ConnectionManager::new_with_config(client.clone(), config),
                )
                .await
                .map_err(|_| Unavailable("redis connect timed out".into()))?
                .map_err(|e| Unavailable(e.to_string()))
            })
            .await?;
        Ok(Some(conn.clone()))
    }

    /// Record `jti` of `client` until `ttl_secs` from now; false if it was already seen.
    pub async fn first_use(
        &self,
        client: &str,
        jti: &str,
        now: i64,
        ttl_secs: i64,
    ) -> Result<bool, Unavailable> {
        let key = format!("{}jti:{client}:{jti}", self.prefix);
        let ttl = ttl_secs.max(1);
        if let Some(mut conn) = self.connection().await? {
            let mut command = redis::cmd("SET");
            command.arg(&key).arg(1).arg("NX").arg("EX").arg(ttl);
            let set = command.query_async::<Option<String>>(&mut conn);
            let reply = tokio::time::timeout(self.timeout, set)
                .await
                .map_err(|_| Unavailable("redis timed out".into()))?
                .map_err(|e| Unavailable(e.to_string()))?;
            return Ok(reply.is_some());
        }
        let mut seen = self
            .seen
            .lock()
            .map_err(|_| Unavailable("replay cache poisoned".into()))?;
        if seen.len() >= 1024 && seen.len().is_power_of_two() {
            seen.retain(|_, expires| *expires > now);
        }
        match seen.get(&key) {
            Some(expires) if *expires > now => Ok(false),
            _ => {
                seen.insert(key, now + ttl);
                Ok(true)
            }
        }
    }

    /// Take one request from the bucket `scope:key` with `limit`.
    pub async fn check(
        &self,
        scope: &str,
        key: &str,
        limit: RateLimit,
    ) -> Result<Verdict, Unavailable> {
        let budget = Budget { scope, key, limit };
        Ok(self.check_all(&[budget]).await?.1)
    }

    /// Take one request from each of `budgets`; the verdict and the index of the budget it is
    /// about (the one that refused, else the one with the least remaining). With Redis it is
    /// all or nothing in one round trip; in process the budgets are taken in order and those
    /// before a refusing one stay spent (put the narrowest first).
    pub async fn check_all(&self, budgets: &[Budget<'_>]) -> Result<(usize, Verdict), Unavailable> {
        if let Some(mut conn) = self.connection().await? {
            let mut invocation = self.script.prepare_invoke();
            for b in budgets {
                let emission_ms = (60_000 / u64::from(b.limit.per_minute.max(1))).max(1);
                invocation
                    .key(format!("{}rl:{}:{}", self.prefix, b.scope, b.key))
                    .arg(emission_ms)
                    .arg(b.limit.burst);
            }
            let reply = tokio::time::timeout(
                self.timeout,
                invocation.invoke_async::<(i64, i64, i64, i64)>(&mut conn),
            )
            .await
            .map_err(|_| Unavailable("redis timed out".into()))?
            .map_err(|e| Unavailable(e.to_string()))?;
            let (allowed, wait_ms, remaining, which) = reply;
            let index = usize::try_from(which - 1)
                .unwrap_or(0)
                .min(budgets.len() - 1);
            let limit = budgets[index].limit.burst;
            return Ok((
                index,
                if allowed == 1 {
                    Verdict::Allowed {
                        limit,
                        remaining: u32::try_from(remaining).unwrap_or(0),
                    }
                } else {
                    Verdict::Limited {
                        limit,
                        retry_after_secs: u64::try_from(wait_ms).unwrap_or(0).div_ceil(1000).max(1),
                    }
                },
            ));
        }
        let mut least: Option<(usize, Verdict)> = None;
        for (index, b) in budgets.iter().enumerate() {
            let verdict = self.check_in_process(b)?;
            match verdict {
                Verdict::Limited { .. } => return Ok((index, verdict)),
                Verdict::Allowed { remaining, .. } => {
                    if !matches!(least, Some((_, Verdict::Allowed { remaining: r, .. })) if r <= remaining)
                    {
                        least = Some((index, verdict));
                    }
                }
            }
        }
        least.ok_or_else(|| Unavailable("no rate-limit budget given".into()))
    }

    fn check_in_process(&self, b: &Budget<'_>) -> Result<Verdict, Unavailable> {
        let limiter = {
            let mut map = self
                .limiters
                .lock()
                .map_err(|_| Unavailable("rate limiter poisoned".into()))?;
            map.entry((b.scope.to_string(), b.limit))
                .or_insert_with(|| {
                    let per_minute = NonZeroU32::new(b.limit.per_minute).unwrap_or(NonZeroU32::MIN);
                    let burst = NonZeroU32::new(b.limit.burst).unwrap_or(NonZeroU32::MIN);
                    Arc::new(
                        RateLimiter::keyed(Quota::per_minute(per_minute).allow_burst(burst))
                            .with_middleware::<StateInformationMiddleware>(),
                    )
                })
                .clone()
        };
        // Keys (addresses, tokens) come and go: drop those whose bucket is full again, now
        // and then, so the map holds only recently active keys.
        if self.checks.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
            self.prune();
        }
        Ok(match limiter.check_key(&b.key.to_string()) {
            Ok(snapshot) => Verdict::Allowed {
                limit: b.limit.burst,
                remaining: snapshot.remaining_burst_capacity(),
            },
            Err(not_until) => Verdict::Limited {
                limit: b.limit.burst,
                retry_after_secs: not_until
                    .wait_time_from(DefaultClock::default().now())
                    .as_secs_f64()
                    .ceil()
                    .max(1.0) as u64,
            },
        })
    }

    fn prune(&self) {
        let limiters: Vec<Arc<Limiter>> = match self.limiters.lock() {
            Ok(map) => map.values().cloned().collect(),
            Err(_) => return,
        };
        for limiter in limiters {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// Keys held by the in-process limiters.
    #[cfg(test)]
    fn keys_held(&self) -> usize {
        self.limiters
            .lock()
            .map(|map| map.values().map(|l| l.len()).sum())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn limit(per_minute: u32, burst: u32) -> RateLimit {
        RateLimit { per_minute, burst }
    }

    /// In process: budgets are taken in order; the verdict names the refusing budget, else the
    /// one with the least remaining.
    #[tokio::test]
    async fn several_budgets_in_process() {
        let limits = SharedLimits::new(None, "t:", Duration::from_secs(1));
        let budgets = [
            Budget {
                scope: "token",
                key: "t1",
                limit: limit(1, 2),
            },
            Budget {
                scope: "inst",
                key: "h1",
                limit: limit(1, 3),
            },
        ];
        let (which, first) = limits.check_all(&budgets).await.unwrap();
        assert_eq!(
            (which, first),
            (
                0,
                Verdict::Allowed {
                    limit: 2,
                    remaining: 1
                }
            )
        );
        limits.check_all(&budgets).await.unwrap();
        let (which, refused) = limits.check_all(&budgets).await.unwrap();
        assert_eq!(which, 0);
        assert!(matches!(
            refused,
            Verdict::Limited {
                limit: 2,
                retry_after_secs: 30..
            }
        ));
        // Another token of the institution: its budget is fresh, the institution's has 1 left.
        let other = [
            Budget {
                scope: "token",
                key: "t2",
                limit: limit(1, 2),
            },
            budgets[1],
        ];
        let (which, _) = limits.check_all(&other).await.unwrap();
        assert_eq!(which, 1);
        let (which, refused) = limits.check_all(&other).await.unwrap();
        assert_eq!(which, 1);
        assert!(matches!(refused, Verdict::Limited { limit: 3, .. }));
    }

    /// Idle keys (their bucket full again) are pruned: the in-process map does not grow with
    /// every token and address ever seen.
    #[tokio::test]
    async fn idle_keys_are_pruned() {
        let limits = SharedLimits::new(None, "t:", Duration::from_secs(1));
        for i in 0..500 {
            let key = format!("10.0.{}.{}", i / 256, i % 256);
            limits
                .check("directory", &key, limit(60_000, 1))
                .await
                .unwrap();
        }
        limits
            .check("directory", "busy", limit(1, 5))
            .await
            .unwrap();
        assert_eq!(limits.keys_held(), 501);
        tokio::time::sleep(Duration::from_millis(20)).await;
        limits.prune();
        assert_eq!(
            limits.keys_held(),
            1,
            "only the key still short of its burst stays"
        );
    }
}
