//! `orderflow topology [--declare] [--json]`: print (or declare) every exchange, queue and binding.

use orderflow_shared::amqp::{Topology, topology::ArgValue};
use serde_json::json;

pub fn render_text(topology: &Topology) -> String {
    let mut out = String::new();
    out.push_str(&format!("namespace: {}\n\nexchanges (durable):\n", topology.ns));
    for e in topology.exchanges() {
        out.push_str(&format!("  {:<40} {}\n", e.name, e.kind));
    }
    out.push_str("\nqueues (durable):\n");
    for q in topology.queues() {
        out.push_str(&format!("  {:<40} {}\n", q.name, q.role));
        for (k, v) in &q.arguments {
            let v = match v {
                ArgValue::Text(s) => s.clone(),
                ArgValue::Int(n) => n.to_string(),
                ArgValue::Bool(b) => b.to_string(),
            };
            out.push_str(&format!("      {k} = {v}\n"));
        }
    }
    out.push_str(&format!(
        "  {:<40} fetch job + checkpoint of one account (quorum, single active consumer: the owner; the only object per account)\n  {:<40} fetcher replicas (presence; consumers = live replicas)\n",
        topology.fetch_queue("<account>"),
        topology.fetch_replicas_queue()
    ));
    out.push_str("\nbindings:\n");
    for b in topology.bindings() {
        out.push_str(&format!("  {} --{}--> {}\n", b.exchange, b.routing_key, b.queue));
    }
    match (topology.ledger_spec(), topology.ledger_index_spec()) {
        (Some(ledger), Some(index)) => {
            out.push_str("\nledger:\n");
            for (exchange, spec) in [(topology.ledger_exchange(), ledger), (topology.ledger_index_exchange(), index)] {
                out.push_str(&format!(
                    "  {exchange:<40} fanout (every stage publishes here)\n  {:<40} {}\n",
                    spec.name, spec.role
                ));
                for (k, v) in &spec.arguments {
                    out.push_str(&format!("      {k} = {}\n", arg_text(v)));
                }
            }
        }
        _ => out.push_str("\nledger: off (LEDGER=off)\n"),
    }
    out
}

fn arg_text(v: &ArgValue) -> String {
    match v {
        ArgValue::Text(s) => s.clone(),
        ArgValue::Int(n) => n.to_string(),
        ArgValue::Bool(b) => b.to_string(),
    }
}

pub fn render_json(topology: &Topology) -> serde_json::Value {
    json!({
        "namespace": topology.ns,
        "exchanges": topology.exchanges(),
        "queues": topology.queues(),
        "bindings": topology.bindings(),
        "ledger": topology.ledger_spec().map(|spec| json!({"exchange": topology.ledger_exchange(), "stream": spec})),
        "ledger_index": topology
            .ledger_index_spec()
            .map(|spec| json!({"exchange": topology.ledger_index_exchange(), "stream": spec})),
    })
}
