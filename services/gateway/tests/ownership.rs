//! Session ownership against a real redis-server: epochs only grow, a stale
//! owner cannot refresh or release a newer owner's record.
use trellis_core::local_redis::{LocalRedis, RedisData};
use trellis_core::redis_conn;
use trellis_gateway::ownership;

#[tokio::test]
async fn epochs_grow_and_stale_owners_are_fenced() -> anyhow::Result<()> {
    let server = LocalRedis::start(RedisData::Ephemeral)?;
    let mut redis = redis_conn::connect(&server.url()).await?;
    let dev = "0123456789abcdef01234567";

    let first = ownership::claim(&mut redis, dev, "gw-a", "10.0.0.1:1000", 60).await?;
    assert!(first.previous.is_none());
    let second = ownership::claim(&mut redis, dev, "gw-b", "10.0.0.2:2000", 60).await?;
    assert!(second.epoch > first.epoch);
    let prev = second.previous.expect("the first session is reported");
    assert_eq!(prev.gateway_id, "gw-a");
    assert_eq!(prev.epoch, first.epoch);
    assert_eq!(prev.peer_addr, "10.0.0.1:1000");

    // The old owner learns it lost the device and cannot extend or delete
    // the new owner's record.
    assert_eq!(
        ownership::refresh(&mut redis, dev, first.epoch, 60).await?,
        second.epoch
    );
    assert!(!ownership::release(&mut redis, dev, first.epoch).await?);
    let owner = ownership::current(&mut redis, dev)
        .await?
        .expect("still owned");
    assert_eq!(owner.gateway_id, "gw-b");

    // The real owner releases; the epoch counter survives the release, so
    // the next session is newer than every one before it.
    assert!(ownership::release(&mut redis, dev, second.epoch).await?);
    assert!(ownership::current(&mut redis, dev).await?.is_none());
    let third = ownership::claim(&mut redis, dev, "gw-a", "10.0.0.1:1001", 60).await?;
    assert!(third.epoch > second.epoch);
    assert!(third.previous.is_none());
    Ok(())
}

#[tokio::test]
async fn a_redis_that_goes_away_is_an_error_not_a_panic() -> anyhow::Result<()> {
    let mut server = LocalRedis::start(RedisData::Ephemeral)?;
    let mut redis = redis_conn::connect(&server.url()).await?;
    server.kill();
    let r = ownership::claim(&mut redis, "0123456789abcdef01234567", "gw", "p", 60).await;
    assert!(r.is_err());
    Ok(())
}

#[tokio::test]
async fn a_claim_and_its_companion_commands_survive_a_flushed_script_cache() -> anyhow::Result<()> {
    let server = LocalRedis::start(RedisData::Ephemeral)?;
    let mut redis = redis_conn::connect(&server.url()).await?;
    let dev = "0123456789abcdef01234567";
    let first = ownership::claim(&mut redis, dev, "gw-a", "10.0.0.1:1000", 60).await?;

    // A restarted Redis has no scripts: the pipelined EVALSHA answers
    // NOSCRIPT, and the claim must load the script and send it all again.
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut redis)
        .await?;
    let second = ownership::claim_with(&mut redis, dev, "gw-b", "10.0.0.2:2000", 60, |pipe| {
        pipe.cmd("INCR").arg("companion").ignore();
    })
    .await?;
    assert!(second.epoch > first.epoch);
    assert_eq!(
        second.previous.map(|p| p.gateway_id).as_deref(),
        Some("gw-a")
    );
    // Sent once with the NOSCRIPT answer and once more with the retry.
    let companion: i64 = redis::cmd("GET")
        .arg("companion")
        .query_async(&mut redis)
        .await?;
    assert_eq!(companion, 2);
    let owner = ownership::current(&mut redis, dev).await?.expect("owned");
    assert_eq!(
        (owner.gateway_id.as_str(), owner.epoch),
        ("gw-b", second.epoch)
    );
    Ok(())
}
