//! The router against a real redis-server: a command that arrives between
//! a session's claim in Redis and its registration in the gateway (the
//! clone check runs in between) waits for that session instead of failing
//! as "did not reconnect".
use std::sync::Arc;
use std::time::{Duration, Instant};
use trellis_core::local_redis::{LocalRedis, RedisData};
use trellis_core::redis_conn;
use trellis_gateway::local::{Inbox, LocalSessions, SessionCommand};
use trellis_gateway::ownership;
use trellis_gateway::routing::{Action, Output, Router};

#[tokio::test]
async fn a_command_in_the_gap_between_claim_and_registration_reaches_the_session()
-> anyhow::Result<()> {
    let server = LocalRedis::start(RedisData::Ephemeral)?;
    let mut redis = redis_conn::connect(&server.url()).await?;
    let dev = "0123456789abcdef01234567";
    let local = Arc::new(LocalSessions::default());
    let router = Arc::new(Router::new(
        "gw-a".into(),
        redis.clone(),
        Arc::clone(&local),
    ));
    let claim = ownership::claim(&mut redis, dev, "gw-a", "127.0.0.1:4000", 60).await?;

    let started = Instant::now();
    let call = tokio::spawn({
        let router = Arc::clone(&router);
        async move {
            router
                .execute(
                    dev,
                    Action::CallFunction {
                        name: "add".into(),
                        argument: "1,2".into(),
                        signed: None,
                    },
                    Duration::from_secs(3),
                )
                .await
        }
    });
    // The session registers 300 ms after its claim, and answers.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let inbox = Arc::new(Inbox::default());
    local.insert(
        dev,
        claim.epoch,
        "127.0.0.1:4000".parse()?,
        Arc::clone(&inbox),
    );
    tokio::spawn(async move {
        while let Some(cmd) = inbox.recv().await {
            if let SessionCommand::Execute { reply, .. } = cmd {
                let _ = reply.send(Ok(Output::FunctionReturn(3)));
            }
        }
    });

    let outcome = call.await?;
    assert!(
        matches!(outcome, Ok(Output::FunctionReturn(3))),
        "{outcome:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered by the session once it registered, not at the deadline"
    );
    Ok(())
}
