//! Redis outages: with Redis unreachable the service answers correctly on the SQL path,
//! `/readyz` says Redis is down (and stays ready), and the gate comes back by itself.

use std::time::{Duration, Instant};

use spray::config::Settings;

use crate::common::cluster::OwnRedis;
use crate::common::{OWNER, RawRedis, TestApp, plain_get};

async fn readiness(app: &TestApp) -> serde_json::Value {
    let answer = app.send(plain_get("/readyz")).await;
    answer.assert_status(200);
    answer.body
}

#[tokio::test]
async fn with_redis_unreachable_the_service_answers_on_sql_and_stays_ready() {
    let redis = OwnRedis::start();
    let app = TestApp::with_settings(Settings {
        redis_url: Some(redis.url()),
        ..Settings::default()
    })
    .await;
    redis.stop();
    let token = app.spray(1000, 3).await;
    app.receive(2, &token).await.assert_status(200);
    app.receive(2, &token)
        .await
        .assert_problem(409, "ALREADY_RECEIVED");
    app.receive(OWNER, &token).await.assert_problem(403, "OWN_SPRAY");
    app.receive(3, &token).await.assert_status(200);
    app.receive(4, &token).await.assert_status(200);
    app.receive(5, &token)
        .await
        .assert_problem(409, "SPRAY_EXHAUSTED");
    let ready = readiness(&app).await;
    assert_eq!(
        (ready["sql"].as_str(), ready["redis"].as_str()),
        (Some("up"), Some("down"))
    );
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn the_gate_comes_back_by_itself_when_redis_does() {
    let redis = OwnRedis::start();
    let settings = Settings {
        redis_url: Some(redis.url()),
        ..Settings::default()
    };
    let app = TestApp::with_settings(settings).await;
    let token = app.spray(1000, 10).await;
    app.receive(2, &token).await.assert_status(200);
    redis.stop();
    app.receive(3, &token).await.assert_status(200);
    redis.restart();
    assert_eq!(readiness(&app).await["redis"], "up");
    // Once the back-off has passed, a receive goes through Redis again and rebuilds the
    // spray's keys from SQL. Bounded: the back-off is one second.
    let keys = app.gate_keys(&token);
    let mut raw = RawRedis::connect_url(&redis.url()).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut user = 4;
    loop {
        app.receive(user, &token).await.assert_status(200);
        user += 1;
        let free: i64 = raw.query(redis::cmd("LLEN").arg(&keys.free)).await;
        if free > 0 {
            // Rebuilt from SQL: exactly the shares nobody holds yet.
            assert_eq!(free, 10 - (user - 2));
            break;
        }
        assert!(
            Instant::now() < deadline && user < 10,
            "the gate did not come back"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let details = app.lookup(OWNER, &token).await.body;
    assert_eq!(
        details["recipients"].as_array().unwrap().len(),
        usize::try_from(user - 2).unwrap()
    );
    app.assert_audit_clean().await;
}
