//! `orderflow bench e2e` end to end at a small size: the pipeline syncs every Confirmed order and
//! reports throughput, latency and per-process usage; the raw relay moves the same pages and
//! records through plain lapin. (The figures themselves are the README's, measured in release.)

use orderflow_lab::{
    e2e::{E2eOptions, pipeline},
    relay::relay,
};
use orderflow_tests::*;

#[tokio::test(flavor = "multi_thread")]
async fn the_e2e_bench_measures_the_pipeline_and_the_raw_relay() {
    let _guard = heavy().await;
    let broker = broker_args("unused").await;
    let bin_dir = orderflow_lab::stack::default_bin_dir();
    let options = E2eOptions { writer_concurrency: 32, relay: true, ..E2eOptions::new(3000, 2, 1) };
    let (result, _) = pipeline(&bin_dir, &broker, &options).await.expect("the pipeline run");
    assert!(result.orders > 1000, "{result:?}");
    assert!(result.pages >= result.orders / 50, "{result:?}");
    assert!(result.orders_per_sec > 0.0 && result.latency_p99_ms >= result.latency_p50_ms, "{result:?}");
    let mut stages_cpu = 0.0;
    for role in ["fetcher#0", "transformer#0", "writer#0", "jst-sim#0", "target-sim#0"] {
        let p = result.processes.iter().find(|p| p.process == role).unwrap_or_else(|| panic!("{role} in {result:?}"));
        // CPU is counted in 10 ms ticks: a simulator serving a second-long run may show none.
        assert!(p.cpu_seconds >= 0.0 && p.peak_rss_mib > 1.0 && p.peak_rss_mib >= p.rss_at_end_mib, "{p:?}");
        if !role.contains("-sim") {
            stages_cpu += p.cpu_seconds;
        }
    }
    assert!(stages_cpu > 0.0, "the stages' CPU is measured: {result:?}");
    let relay = relay(&broker, 40, 50, 1).await.expect("the raw relay");
    assert_eq!(relay.records, 2000);
    assert!(relay.page_bytes > 50 * relay.record_bytes / 2 && relay.records_per_sec > 0.0, "{relay:?}");
}
