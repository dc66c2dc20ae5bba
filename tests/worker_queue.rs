//! The queue layer against the real RabbitMQ: idempotent topology, confirmed publishing with the job
//! message properties of contract §5, unroutable publishes as errors, and the results stream read from
//! `first` and from a numeric offset, with markers hidden from event readers.

mod common;

use std::time::Duration;

use fleet::events::{testing, EventKind, Notice, NoticeBody, WorkerStartFailed};
use fleet::job::EndpointKind;
use fleet::queue::{
    delivery_attempt, header_str, subscribe_raw, subscribe_results, Publisher, QueueError,
    StreamItem, StreamOffset,
};
use futures::StreamExt;
use lapin::options::BasicGetOptions;
use lapin::BasicProperties;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn topology_is_idempotent_and_jobs_carry_the_contract_properties() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let ch = conn.create_channel().await.expect("channel");
    topology
        .declare(&ch)
        .await
        .expect("second declare with the same arguments succeeds");

    let publisher = Publisher::new(&conn, topology.clone())
        .await
        .expect("publisher");
    let job = common::job(
        EndpointKind::Sprint,
        json!({"prompt": "a fox", "image_size": "square"}),
    );
    publisher
        .publish_job(&job)
        .await
        .expect("confirmed publish");

    let got = ch
        .basic_get(
            topology.job_queue(EndpointKind::Sprint).into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .expect("basic.get")
        .expect("the job is in the sprint queue");
    let props = &got.delivery.properties;
    assert_eq!(
        props.message_id().as_ref().map(|s| s.as_str()),
        Some(job.request_id.as_str())
    );
    assert_eq!(props.delivery_mode(), &Some(2), "persistent");
    assert_eq!(
        props.content_type().as_ref().map(|s| s.as_str()),
        Some("application/json")
    );
    assert_eq!(header_str(props, "x-endpoint").as_deref(), Some("sprint"));
    assert_eq!(delivery_attempt(props), 1);
    let body: fleet::events::JobMessage =
        serde_json::from_slice(&got.delivery.data).expect("job JSON");
    assert_eq!(body, job);
    let base = ch
        .basic_get(
            topology.job_queue(EndpointKind::Base).into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .expect("basic.get");
    assert!(base.is_none(), "routing by kind: nothing in the base queue");

    let err = publisher
        .publish_raw(
            &topology.jobs_exchange(),
            "no-such-kind",
            b"{}",
            BasicProperties::default(),
        )
        .await
        .expect_err("mandatory publish without a route fails");
    assert!(matches!(err, QueueError::Unroutable { .. }), "{err:?}");
    assert!(!err.is_retryable());
    common::drop_topology(&conn, &topology).await;
}

#[tokio::test]
async fn results_stream_replays_from_first_and_from_an_offset() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let publisher = Publisher::new(&conn, topology.clone())
        .await
        .expect("publisher");
    let ids = ["r-0", "r-1", "r-2"];
    for (i, id) in ids.iter().enumerate() {
        publisher
            .publish_event(&testing::event(id, EndpointKind::Base, EventKind::Queued))
            .await
            .expect("event");
        if i == 0 {
            publisher.publish_marker("m-1").await.expect("marker");
        }
        if i == 1 {
            let notice = Notice::new(
                EndpointKind::Base,
                NoticeBody::WorkerStartFailed(WorkerStartFailed {
                    worker: "w".into(),
                    cause: "test".into(),
                    failures: 1,
                    retry_in: 30.0,
                }),
            );
            publisher.publish_notice(&notice).await.expect("notice");
        }
    }

    let mut all = subscribe_results(&conn, &topology, StreamOffset::First)
        .await
        .expect("subscribe");
    let mut seen = Vec::new();
    for _ in 0..3 {
        let (offset, event) = tokio::time::timeout(WAIT, all.next())
            .await
            .expect("event in time")
            .expect("open")
            .expect("ok");
        seen.push((offset, event));
    }
    assert_eq!(
        seen.iter()
            .map(|(_, e)| e.request_id.as_str())
            .collect::<Vec<_>>(),
        ids,
        "order kept, marker and notice hidden"
    );
    assert!(
        seen.windows(2).all(|w| w[0].0 < w[1].0),
        "offsets increase: {:?}",
        seen.iter().map(|s| s.0).collect::<Vec<_>>()
    );

    let second = seen[1].0;
    let mut from = subscribe_results(&conn, &topology, StreamOffset::Offset(second))
        .await
        .expect("subscribe at offset");
    let (offset, event) = tokio::time::timeout(WAIT, from.next())
        .await
        .expect("in time")
        .expect("open")
        .expect("ok");
    assert_eq!((offset, event.request_id.as_str()), (second, "r-1"));

    let mut raw = subscribe_raw(&conn, &topology, StreamOffset::First)
        .await
        .expect("subscribe raw");
    let mut kinds = Vec::new();
    for _ in 0..5 {
        let (_, item) = tokio::time::timeout(WAIT, raw.next())
            .await
            .expect("in time")
            .expect("open")
            .expect("ok");
        kinds.push(match item {
            StreamItem::Event(e) => e.request_id,
            StreamItem::Marker(m) => format!("marker:{m}"),
            StreamItem::Notice(n) => format!("notice:{}", n.routing_key()),
        });
    }
    assert_eq!(
        kinds,
        ["r-0", "marker:m-1", "r-1", "notice:base.notice", "r-2"]
    );

    let mut next = subscribe_results(&conn, &topology, StreamOffset::Next)
        .await
        .expect("subscribe next");
    publisher
        .publish_event(&testing::event(
            "r-3",
            EndpointKind::Sprint,
            EventKind::Started,
        ))
        .await
        .expect("event");
    let (_, event) = tokio::time::timeout(WAIT, next.next())
        .await
        .expect("in time")
        .expect("open")
        .expect("ok");
    assert_eq!(
        event.request_id, "r-3",
        "`next` starts after what was there"
    );
    common::drop_topology(&conn, &topology).await;
}
