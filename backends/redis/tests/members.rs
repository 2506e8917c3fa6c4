//! Real processes sharing one group through Redis: three member processes,
//! one killed with SIGKILL mid-work, in stream and in queue mode
//! (`conveyor_conformance::members`), on the shared server
//! (`CONVEYOR_REDIS_URL`, else the local default). Each test works in a
//! namespace of its own, deleted at the end.

mod common;

use conveyor_core::BrokerOptions;
use conveyor_redis::Topology;

conveyor_conformance::members_suite!(
    |ns| Box::pin(async move {
        common::open_dyn(
            &Topology::single(common::url()),
            &ns,
            BrokerOptions::default(),
        )
        .await
    }),
    |ns| Box::pin(async move { common::drop_ns(&Topology::single(common::url()), &ns).await })
);
