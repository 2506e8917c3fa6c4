//! Real processes sharing one group through PostgreSQL: three member
//! processes, one killed with SIGKILL mid-work, in stream and in queue
//! mode (`conveyor_conformance::members`). Each test works in a schema of
//! its own, dropped at the end.

mod common;

use conveyor_core::BrokerOptions;

conveyor_conformance::members_suite!(
    |schema| Box::pin(async move { common::open_dyn(&schema, BrokerOptions::default()).await }),
    |schema| Box::pin(async move { common::drop_schema(&schema).await })
);
