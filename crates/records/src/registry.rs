//! Keyvault's device registry as other services read it: the scheduler
//! picks a rollout's targets here. Keyvault writes the records
//! (`keys::device(id)`: hash with product_id, organization, public_key_der,
//! revoked "1"/"0", tags comma-separated, registration and revocation
//! times; `keys::DEVICE_INDEX`: every registered id).
use redis::AsyncCommands;
use trellis_core::redis_conn::{Redis, keys};

/// The product's registered, unrevoked devices (with their organisation),
/// only those carrying `tag` when one is given.
pub async fn fleet(
    redis: &mut Redis,
    product_id: u32,
    tag: Option<&str>,
) -> redis::RedisResult<Vec<(String, String)>> {
    let mut ids: Vec<String> = redis.smembers(keys::DEVICE_INDEX).await?;
    ids.sort();
    let mut out = Vec::new();
    for chunk in ids.chunks(500) {
        let mut pipe = redis::pipe();
        for id in chunk {
            pipe.cmd("HMGET").arg(keys::device(id)).arg(&[
                "product_id",
                "revoked",
                "organization",
                "tags",
            ]);
        }
        type Row = (
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
        );
        let rows: Vec<Row> = pipe.query_async(redis).await?;
        for (id, (product, revoked, org, tags)) in chunk.iter().zip(rows) {
            let product: Option<u32> = product.and_then(|p| p.parse().ok());
            let tagged = tag.is_none_or(|want| {
                tags.as_deref()
                    .unwrap_or_default()
                    .split(',')
                    .any(|t| t == want)
            });
            if product == Some(product_id) && revoked.as_deref() != Some("1") && tagged {
                out.push((id.clone(), org.unwrap_or_default()));
            }
        }
    }
    Ok(out)
}

/// A registered device: (product id, revoked, organisation).
pub async fn registered(
    redis: &mut Redis,
    device_id: &str,
) -> redis::RedisResult<Option<(u32, bool, String)>> {
    let (product, revoked, org): (Option<String>, Option<String>, Option<String>) =
        redis::cmd("HMGET")
            .arg(keys::device(device_id))
            .arg(&["product_id", "revoked", "organization"])
            .query_async(redis)
            .await?;
    Ok(product.map(|p| {
        (
            p.parse().unwrap_or(0),
            revoked.as_deref() == Some("1"),
            org.unwrap_or_default(),
        )
    }))
}
