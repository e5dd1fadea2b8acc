//! State the replicas must share: the `jti` replay cache and the token-endpoint rate limits.
//!
//! With `redis.url` set, both live in Redis (one view for every replica): the replay cache is
//! `SET key 1 NX EX ttl`; rate limits are GCRA in a Lua script (atomic, Redis clock). Without
//! Redis they are in-process (a map with expiry; `governor` limiters) — correct for one node.
//! When Redis is configured but unreachable the token endpoint fails closed (503).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use redis::aio::ConnectionManager;
use tokio::sync::OnceCell;

use crate::config::RateLimit;

type Limiter = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

/// Outcome of a rate-limit check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed { limit: u32, remaining: u32 },
    Limited { limit: u32, retry_after_secs: u64 },
}

/// GCRA: KEYS[1] = key; ARGV[1] = emission interval (ms); ARGV[2] = burst.
/// Returns {allowed (0/1), retry after (ms), remaining}.
const GCRA_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local emission = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + emission
local allow_at = new_tat - emission * burst
if now < allow_at then
  return {0, allow_at - now, 0}
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil(new_tat - now))
return {1, 0, math.floor((now - allow_at) / emission)}
";

pub struct SharedLimits {
    redis: Option<redis::Client>,
    conn: OnceCell<ConnectionManager>,
    prefix: String,
    timeout: Duration,
    script: redis::Script,
    seen: Mutex<HashMap<String, i64>>,
    limiters: Mutex<HashMap<String, (RateLimit, Arc<Limiter>)>>,
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
        let name = format!("{}rl:{scope}:{key}", self.prefix);
        if let Some(mut conn) = self.connection().await? {
            let emission_ms = (60_000 / u64::from(limit.per_minute.max(1))).max(1);
            let mut invocation = self.script.prepare_invoke();
            invocation.key(&name).arg(emission_ms).arg(limit.burst);
            let reply = tokio::time::timeout(
                self.timeout,
                invocation.invoke_async::<(i64, i64, i64)>(&mut conn),
            )
            .await
            .map_err(|_| Unavailable("redis timed out".into()))?
            .map_err(|e| Unavailable(e.to_string()))?;
            return Ok(match reply {
                (1, _, remaining) => Verdict::Allowed {
                    limit: limit.burst,
                    remaining: u32::try_from(remaining).unwrap_or(0),
                },
                (_, wait_ms, _) => Verdict::Limited {
                    limit: limit.burst,
                    retry_after_secs: (u64::try_from(wait_ms).unwrap_or(0)).div_ceil(1000).max(1),
                },
            });
        }
        let limiter = {
            let mut map = self
                .limiters
                .lock()
                .map_err(|_| Unavailable("rate limiter poisoned".into()))?;
            match map.get(&name) {
                Some((l, limiter)) if *l == limit => limiter.clone(),
                _ => {
                    let per_minute = NonZeroU32::new(limit.per_minute).unwrap_or(NonZeroU32::MIN);
                    let burst = NonZeroU32::new(limit.burst).unwrap_or(NonZeroU32::MIN);
                    let limiter = Arc::new(
                        RateLimiter::direct(Quota::per_minute(per_minute).allow_burst(burst))
                            .with_middleware::<StateInformationMiddleware>(),
                    );
                    map.insert(name, (limit, limiter.clone()));
                    limiter
                }
            }
        };
        Ok(match limiter.check() {
            Ok(snapshot) => Verdict::Allowed {
                limit: limit.burst,
                remaining: snapshot.remaining_burst_capacity(),
            },
            Err(not_until) => Verdict::Limited {
                limit: limit.burst,
                retry_after_secs: not_until
                    .wait_time_from(DefaultClock::default().now())
                    .as_secs_f64()
                    .ceil()
                    .max(1.0) as u64,
            },
        })
    }
}
