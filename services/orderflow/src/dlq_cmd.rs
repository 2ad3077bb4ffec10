//! `orderflow dlq stats|peek|replay|purge`: runs the subcommand and prints its result (JSON with
//! `--json`, else lines for a person).

use std::process::ExitCode;

use orderflow_shared::amqp::{Topology, ops::Client};
use serde_json::Value;

use crate::dlq::{self, DlqCommand, ReplayArgs};

pub async fn run(client: &Client, topology: &Topology, command: DlqCommand) -> anyhow::Result<ExitCode> {
    match command {
        DlqCommand::Stats { json } => stats(client, topology, json).await,
        DlqCommand::Peek { stage, limit, json } => peek(client, topology, stage, limit, json).await,
        DlqCommand::Replay(args) => replay(client, topology, &args).await,
        DlqCommand::Purge { stage, reason, older_than, yes, json } => {
            if !yes {
                anyhow::bail!(
                    "purge deletes dead letters for good: add --yes (see them first with `orderflow dlq peek --stage {stage}`)"
                );
            }
            let before_ms = older_than.map(|d| jiff::Timestamp::now().as_millisecond() - d.as_millis() as i64);
            let filter = dlq::Filter { reason, ids: Vec::new(), since_ms: None, before_ms };
            let deleted = dlq::purge(client, topology, stage, &filter).await?;
            if json {
                println!("{}", serde_json::json!({"deleted": deleted}));
            } else {
                println!("deleted {deleted} dead letters from {}", topology.dead_queue(stage));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn stats(client: &Client, topology: &Topology, json: bool) -> anyhow::Result<ExitCode> {
    let stats = dlq::stats(client, topology).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
        return Ok(ExitCode::SUCCESS);
    }
    for s in &stats {
        println!("{:<12} {:>7} dead letters in {}", s.stage, s.count, s.queue);
        if let Some(age) = s.oldest_age_seconds {
            println!("             oldest {age} s ago");
        }
        let mut reasons: Vec<_> = s.reasons.iter().collect();
        reasons.sort_by(|a, b| b.1.cmp(a.1));
        for (reason, n) in reasons.iter().take(5) {
            println!("             {n:>7} {reason}");
        }
        for (class, n) in &s.classes {
            println!("             {n:>7} class {class}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn peek(
    client: &Client,
    topology: &Topology,
    stage: orderflow_shared::amqp::Stage,
    limit: usize,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let messages = dlq::peek(client, topology, stage, limit).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&messages)?);
    } else if messages.is_empty() {
        println!("no dead letters in {}", topology.dead_queue(stage));
    } else {
        for m in &messages {
            println!("{}", describe(m));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A dead letter as `peek` shows it to a person.
fn describe(m: &Value) -> String {
    format!(
        "{}  reason={} class={} attempts={} replays={} age={}s\n  error: {}\n  origin: {} / {}\n  body: {}\n",
        m["message_id"].as_str().unwrap_or(""),
        m["reason"].as_str().unwrap_or(""),
        m["class"].as_str().unwrap_or(""),
        m["attempts"],
        m["replays"],
        m["age_seconds"],
        m["error"].as_str().unwrap_or(""),
        m["origin"]["exchange"].as_str().unwrap_or("-"),
        m["origin"]["routing_key"].as_str().unwrap_or("-"),
        m["body_excerpt"].as_str().unwrap_or("")
    )
}

async fn replay(client: &Client, topology: &Topology, args: &ReplayArgs) -> anyhow::Result<ExitCode> {
    let since_ms = args.since.as_deref().map(dlq::parse_since).transpose().map_err(anyhow::Error::msg)?;
    if args.rate.is_some_and(|r| r.is_nan() || r <= 0.0) {
        anyhow::bail!("--rate must be a positive number of messages per second");
    }
    let options = dlq::ReplayOptions {
        stage: args.stage,
        filter: dlq::Filter { reason: args.reason.clone(), ids: args.ids.clone(), since_ms, before_ms: None },
        limit: args.limit,
        rate: args.rate,
        dry_run: args.dry_run,
        force: args.force,
        max_replays: args.max_replays,
        progress: !args.json,
    };
    let summary = dlq::replay(client, topology, &options).await?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "{}scanned {} · matched {} · replayed {} · refused {} (replayed > {} times; --force) · failed {} · left in queue {} · {:.1} s",
            if summary.dry_run { "DRY RUN (nothing changed): " } else { "" },
            summary.scanned,
            summary.matched,
            summary.replayed,
            summary.refused,
            args.max_replays,
            summary.failed,
            summary.left,
            summary.seconds
        );
    }
    Ok(if summary.failed > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
}
