//! `orderflow audit`: every Confirmed order of a window accounted for against the source itself.
//! N records are lost downstream on purpose (a raw client takes them out of `<ns>.records` and
//! acks them): the audit reports exactly those N as missing and the rest as written or
//! dead-lettered, `--repair` gets them written, and a second audit is complete — all while live
//! fetching goes on at the real limits (5/s, 100/min) with zero 199/200.

use std::{
    collections::{BTreeSet, HashMap},
    process::Command,
    time::Duration,
};

use orderflow_lab::stack::Role;
use orderflow_shared::{amqp::Topology, messages::header};
use orderflow_tests::*;
use serde_json::{Value, json};

fn orderflow(ns: &str, amqp_url: &str, args: &[&str]) -> (i32, Value, String) {
    ensure_binaries();
    let out = Command::new(orderflow_lab::stack::default_bin_dir().join("orderflow"))
        .args(args)
        .env("AMQP_URL", amqp_url)
        .env("ORDERFLOW_NS", ns)
        .env("LOG_FORMAT", "json")
        .output()
        .expect("orderflow runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let json = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), json, format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
}

/// The o_ids an audit report lists with `status`.
fn listed(report: &Value, status: &str) -> BTreeSet<String> {
    report["not_written"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["status"] == status)
        .filter_map(|c| c["o_id"].as_str().map(str::to_string))
        .collect()
}

/// Confirmed orders per account as jst-sim says now.
async fn truth(stack: &Stack) -> anyhow::Result<HashMap<String, BTreeSet<String>>> {
    Ok(truth_pairs(stack).await?.into_iter().fold(HashMap::new(), |mut by, (account, id)| {
        by.entry(account).or_default().insert(id.to_string());
        by
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_finds_exactly_the_orders_lost_downstream_and_a_repair_gets_them_written() -> anyhow::Result<()> {
    let _heavy = heavy().await;
    let ns = unique_ns("audit");
    let url = broker_url().await;
    let mut options = StackOptions::new(&url, &ns, &log_dir(&ns));
    options.accounts = 2;
    options.orders = 250;
    // The real limits, for jst-sim and the fetchers alike.
    options.rate_per_sec = 5;
    options.rate_per_min = 100;
    // No writer yet: the records wait in <ns>.records for the loss.
    options.writers = 0;
    options.env = [
        ("FETCH_INTERVAL", "2s"),
        // Windows (the audit's too) close 2 s before now rather than 30 s.
        ("FETCH_WINDOW_DELAY", "2s"),
        ("FETCH_SWEEP_EVERY", "0"),
        ("TARGET_PERMANENT_CODES", "40001"),
        ("RETRY_TIERS", "1s"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .to_vec();
    // Orders keep arriving (new ones, and waiting ones confirmed): live fetching never stops.
    options.jst_args = ["--churn-new", "0.5", "--churn-confirm", "0.3"].map(String::from).to_vec();
    // Orders whose id ends in 3 are refused for good: dead-lettered, not missing.
    options.target_args = ["--soft-reject-ids", "*3"].map(String::from).to_vec();
    let mut stack = Stack::start(options).await?;
    let outcome = async {
        let records = Topology::new(ns.clone()).records_queue();
        // Let the backfill and some churn into the records queue, then cut the window: churn
        // from now on only adds new orders, after the window's end.
        let seeded: usize = truth(&stack).await?.values().map(BTreeSet::len).sum();
        wait_for("the backfill in the records queue", Duration::from_secs(120), Duration::from_millis(500), || async {
            let n = queue_state(&stack, &records).await?.map_or(0, |q| q.messages) as usize;
            Ok(if n >= seeded { Ok(()) } else { Err(format!("{n} of {seeded} records")) })
        })
        .await?;
        stack.post_json(&format!("{}/admin/churn", stack.jst_url), &json!({"new_per_sec": 0.5})).await?;
        // Whole seconds: the source's windows are.
        let cut = jiff::Timestamp::from_second(jiff::Timestamp::now().as_second())?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        // The loss: a raw client takes N records and acks them.
        let lost = take(&stack.broker_args(), &records, 7, Duration::from_secs(30)).await?;
        let mut lost_by: HashMap<String, BTreeSet<String>> = HashMap::new();
        for got in &lost {
            let account = got.json()["account"].as_str().unwrap_or_default().to_string();
            lost_by.entry(account).or_default().insert(got.header(header::SOURCE_O_ID).unwrap_or_default());
        }
        stack.spawn_stage(Role::Writer, 0).await?;
        let window_end = orderflow_shared::time::rfc3339_china(cut);
        // Everything Confirmed in the window is written or dead-lettered, but the lost ones.
        let in_window = |stack: &Stack| {
            let stack_url = stack.jst_url.clone();
            let http = stack.http().clone();
            async move {
                let mut by = HashMap::new();
                for account in ["m1", "m2"] {
                    let t: Value =
                        http.get(format!("{stack_url}/admin/truth?account={account}")).send().await?.json().await?;
                    let ids: BTreeSet<String> = t["confirmed"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|o| {
                            o["modified"]
                                .as_str()
                                .and_then(|m| orderflow_shared::time::parse_china(m).ok())
                                .is_some_and(|m| m <= cut)
                        })
                        .filter_map(|o| o["o_id"].as_i64().map(|i| i.to_string()))
                        .collect();
                    by.insert(account.to_string(), ids);
                }
                anyhow::Ok(by)
            }
        };
        let window = in_window(&stack).await?;
        wait_for("the rest written or dead-lettered", Duration::from_secs(180), Duration::from_secs(1), || async {
            let written = stack.written_ids().await?;
            let mut short = 0;
            for (account, ids) in &window {
                let lost = lost_by.get(account).cloned().unwrap_or_default();
                short +=
                    ids.iter().filter(|id| !id.ends_with('3') && !lost.contains(*id) && !written.contains(*id)).count();
            }
            let queued = queue_state(&stack, &records).await?.map_or(0, |q| q.messages);
            Ok(if short == 0 && queued == 0 { Ok(()) } else { Err(format!("{short} not written, {queued} queued")) })
        })
        .await?;

        let mut total_lost = 0;
        for account in ["m1", "m2"] {
            let args = [
                "audit",
                "--account",
                account,
                "--from",
                "4d",
                "--to",
                window_end.as_str(),
                "--in-flight-grace",
                "5s",
                "--json",
            ];
            let (code, report, text) = orderflow(&ns, &url, &args);
            let lost = lost_by.get(account).cloned().unwrap_or_default();
            let expected = if lost.is_empty() { 0 } else { 1 };
            assert_eq!(code, expected, "missing orders (only they) make the audit exit 1: {text}");
            total_lost += lost.len();
            let ids = &window[account];
            assert_eq!(report["to"].as_str(), Some(window_end.as_str()), "listed to the window's end: {text}");
            assert_eq!(
                report["source"].as_u64(),
                Some(ids.len() as u64),
                "the source's Confirmed orders in the window: {text}"
            );
            assert_eq!(listed(&report, "missing"), lost, "exactly the lost orders are missing ({account})");
            let refused: BTreeSet<String> =
                ids.iter().filter(|id| id.ends_with('3') && !lost.contains(*id)).cloned().collect();
            assert_eq!(listed(&report, "dead_lettered"), refused, "the refused ones are dead-lettered ({account})");
            assert_eq!(report["in_flight"].as_u64(), Some(0), "{text}");
            assert_eq!(
                report["written"].as_u64(),
                Some((ids.len() - lost.len() - refused.len()) as u64),
                "the rest are written ({account})"
            );
        }
        assert_eq!(total_lost, 7);

        // Repair: the missing orders are fetched by id and written; a second audit is complete.
        for account in ["m1", "m2"] {
            let lost = lost_by.get(account).cloned().unwrap_or_default();
            let args = [
                "audit",
                "--account",
                account,
                "--from",
                "4d",
                "--to",
                window_end.as_str(),
                "--in-flight-grace",
                "5s",
                "--repair",
                "--json",
            ];
            let (code, report, text) = orderflow(&ns, &url, &args);
            if lost.is_empty() {
                assert_eq!((code, &report["repair"]), (0, &Value::Null), "nothing to repair: {text}");
                continue;
            }
            assert_eq!(code, 1, "{text}");
            assert_eq!(report["repair"]["asked"].as_u64(), Some(lost.len() as u64), "{text}");
            assert_eq!(report["repair"]["not_found"].as_array().map(Vec::len), Some(0), "{text}");
        }
        let lost_all: BTreeSet<String> = lost_by.values().flatten().cloned().collect();
        wait_for("the repaired orders written", Duration::from_secs(120), Duration::from_millis(500), || async {
            let written = stack.written_ids().await?;
            let left = lost_all.iter().filter(|id| !id.ends_with('3') && !written.contains(*id)).count();
            Ok(if left == 0 { Ok(()) } else { Err(format!("{left} repaired orders not written yet")) })
        })
        .await?;
        stack.target_faults(&json!({"soft_reject_ids": ""})).await?;
        for account in ["m1", "m2"] {
            // The refused ones are still dead letters (a replay would write them): lift that from
            // the check by replaying first.
            let (code, _, text) = orderflow(&ns, &url, &["dlq", "replay", "--stage", "writer", "--json"]);
            assert_eq!(code, 0, "{text}");
            let complete = wait_for("a complete audit", Duration::from_secs(120), Duration::from_secs(2), || async {
                let args = [
                    "audit",
                    "--account",
                    account,
                    "--from",
                    "4d",
                    "--to",
                    window_end.as_str(),
                    "--in-flight-grace",
                    "5s",
                    "--json",
                ];
                let (code, report, text) = orderflow(&ns, &url, &args);
                Ok(if code == 0 { Ok(report) } else { Err(format!("exit {code}: {}", &text[..text.len().min(600)])) })
            })
            .await?;
            assert_eq!(complete["complete"], true);
            assert_eq!(complete["missing"].as_u64(), Some(0));
            assert_eq!(complete["written"], complete["source"], "{complete}");
        }
        // Live fetching and the audits together stayed within the merchants' limits.
        for account in ["m1", "m2"] {
            let s = sim_stats(&stack, account).await?;
            for code in ["199", "200"] {
                assert_eq!(s["stats"]["rejections"][code].as_u64().unwrap_or(0), 0, "{account}: code {code}: {s}");
            }
            assert!(s["stats"]["max_concurrent_callers"].as_u64().unwrap_or(0) <= 1, "one caller per merchant: {s}");
        }
        Ok(())
    }
    .await;
    teardown(stack).await;
    outcome
}

/// The scheduled audit (FETCH_AUDIT_EVERY): the fetcher audits the accounts it holds by itself
/// and exports what it found — `orderflow_audit_missing` counts the orders lost downstream, and
/// `orderflow status` shows them as a problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduled_audit_exports_the_missing_orders_and_status_shows_them() -> anyhow::Result<()> {
    let _heavy = heavy().await;
    let ns = unique_ns("audit-scheduled");
    let url = broker_url().await;
    let mut options = StackOptions::new(&url, &ns, &log_dir(&ns));
    options.orders = 120;
    options.writers = 0;
    // Seeded orders modified in the last minute: inside the audit's one-hour window.
    options.jst_args = ["--history", "1m"].map(String::from).to_vec();
    options.env = [
        ("FETCH_INTERVAL", "2s"),
        ("FETCH_WINDOW_DELAY", "1s"),
        ("FETCH_SWEEP_EVERY", "0"),
        ("FETCH_AUDIT_EVERY", "1h"),
        ("FETCH_AUDIT_LAG", "0s"),
        ("FETCH_AUDIT_GRACE", "2s"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .to_vec();
    let mut stack = Stack::start(options).await?;
    let outcome = async {
        let records = Topology::new(ns.clone()).records_queue();
        let seeded: usize = truth(&stack).await?.values().map(BTreeSet::len).sum();
        wait_for("the backfill in the records queue", Duration::from_secs(60), Duration::from_millis(300), || async {
            let n = queue_state(&stack, &records).await?.map_or(0, |q| q.messages) as usize;
            Ok(if n >= seeded { Ok(()) } else { Err(format!("{n} of {seeded} records")) })
        })
        .await?;
        let lost = take(&stack.broker_args(), &records, 3, Duration::from_secs(30)).await?;
        let lost: BTreeSet<String> = lost.iter().filter_map(|g| g.header(header::SOURCE_O_ID)).collect();
        stack.spawn_stage(Role::Writer, 0).await?;
        let fetcher = stack.replicas(Role::Fetcher)[0].admin.expect("admin address");
        let missing = wait_for("the scheduled audit", Duration::from_secs(120), Duration::from_secs(1), || async {
            let runs = metric(fetcher, "orderflow_audit_runs_total", Some("account=\"m1\"")).await?;
            let missing = metric(fetcher, "orderflow_audit_missing", Some("account=\"m1\"")).await?;
            Ok(if runs >= 1.0 { Ok(missing) } else { Err("no audit yet".to_string()) })
        })
        .await?;
        assert_eq!(missing, 3.0, "the three lost orders");
        let (_, status, text) =
            wait_for("the audit in the status", Duration::from_secs(60), Duration::from_secs(1), || async {
                let (code, status, text) = orderflow(&ns, &url, &["status", "--json", "--sample", "100ms"]);
                let audited = status["accounts"][0]["audit"]["missing"].as_u64() == Some(3);
                Ok(if audited { Ok((code, status, text)) } else { Err(text) })
            })
            .await?;
        let ids: BTreeSet<String> = status["accounts"][0]["audit"]["missing_ids"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        assert_eq!(ids, lost, "{text}");
        assert!(status["problems"].to_string().contains("found 3 Confirmed orders nowhere in the pipeline"), "{text}");
        Ok(())
    }
    .await;
    teardown(stack).await;
    outcome
}
