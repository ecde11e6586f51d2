//! `triagem-test-broker`: the Kafka-protocol broker of the integration tests.
//!
//! `serve` hosts librdkafka's mock cluster (`rdkafka::mocking::MockCluster`) in
//! this process and serves it over TCP until the process is killed, so that a
//! test runs the worker under test, the broker and its own clients as separate
//! processes talking TCP. Unlike tansu 0.6.0 (see the README's known issues),
//! it returns exactly the records asked for when a fetch starts inside a
//! produced batch, which every restart, revoke and rebalance depends on; the
//! `broker_conformance` test checks that before the rest of the suite runs.
//!
//! ```text
//! triagem-test-broker serve --topic in:3 --topic out:1 [--brokers 1] [--control]
//! bootstrap.servers=127.0.0.1:40537          <- first line on stdout
//! ```
//!
//! With `--control`, commands are read from stdin, one a line, each answered
//! by one line (`ok` or `error: …`) on stdout, and the broker exits when stdin
//! closes (so a test that dies cannot leak it):
//!
//! - `create TOPIC PARTITIONS` — a topic (the mock cluster has no CreateTopics API);
//! - `down BROKER` / `up BROKER` — drop every connection and refuse new ones /
//!   accept them again (`BROKER` is an id from 1, or `all`);
//! - `rtt BROKER MS` — delay every response of a broker;
//! - `errors API ERROR[,ERROR…]` — the next requests of that API (`Produce`,
//!   `InitProducerId`, `AddPartitionsToTxn`, `AddOffsetsToTxn`, `EndTxn`,
//!   `TxnOffsetCommit`, `OffsetCommit`, `Fetch`) fail with these errors, one
//!   each, in order (`ILLEGAL_GENERATION`, `PRODUCER_FENCED`, …: see [`error_code`]);
//! - `ping` — answers `ok`.
//!
//! With `--transactions` (one broker only) clients talk to a protocol layer
//! in front of the mock cluster that adds what the mock leaves out of Kafka
//! transactions — fencing by `transactional.id`, offsets committed with their
//! transaction, `read_committed` fetches that skip aborted and open
//! transactions (see `transactions.rs`) —, for the exactly-once tests.
//!
//! Topics a client names without creating them are auto-created with 4
//! partitions, like a broker with `auto.create.topics.enable`.
//!
//! `member` is a consumer-group member in its own process (for tests that
//! SIGKILL one): it joins `--group`, prints `assigned P,P,…` (partitions of
//! `--topic`, possibly empty) after each rebalance and polls until killed or
//! until its stdin closes (so that it does not outlive the test that started it).

use std::io::{BufRead, Write};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

#[path = "triagem-test-broker/transactions.rs"]
mod transactions;
use rdkafka::ClientContext;

#[derive(Parser)]
#[command(about = "librdkafka's mock cluster as a broker process, for triagem's integration tests")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serves a mock cluster over TCP until killed; prints `bootstrap.servers=…` first.
    Serve {
        /// Number of brokers in the cluster.
        #[arg(long, default_value_t = 1)]
        brokers: i32,
        /// A topic to create, `NAME:PARTITIONS` (repeatable).
        #[arg(long = "topic", value_name = "NAME:PARTITIONS")]
        topics: Vec<String>,
        /// Read commands from stdin (see the module docs); exit when it closes.
        #[arg(long)]
        control: bool,
        /// Serve through the transaction layer (fencing, offsets in transactions, read_committed); one broker only.
        #[arg(long)]
        transactions: bool,
    },
    /// A consumer-group member that prints its assignments and polls until killed or its stdin closes.
    Member {
        /// Bootstrap servers.
        #[arg(long)]
        bootstrap: String,
        /// Consumer group.
        #[arg(long)]
        group: String,
        /// Topic to subscribe to.
        #[arg(long)]
        topic: String,
        /// `session.timeout.ms` of the member.
        #[arg(long, default_value_t = 6000)]
        session_timeout_ms: u32,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Serve { brokers, topics, control, transactions } => serve(brokers, &topics, control, transactions),
        Cmd::Member { bootstrap, group, topic, session_timeout_ms } => {
            member(&bootstrap, &group, &topic, session_timeout_ms)
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// `NAME:PARTITIONS` → (name, partitions).
fn parse_topic(spec: &str) -> Result<(&str, i32)> {
    let (name, n) = spec.rsplit_once(':').with_context(|| format!("--topic {spec:?}: expected NAME:PARTITIONS"))?;
    let n: i32 = n.parse().with_context(|| format!("--topic {spec:?}: PARTITIONS must be a number"))?;
    if name.is_empty() || n < 1 {
        bail!("--topic {spec:?}: expected a name and at least one partition");
    }
    Ok((name, n))
}

fn serve(brokers: i32, topics: &[String], control: bool, with_transactions: bool) -> Result<()> {
    if brokers < 1 {
        bail!("--brokers must be at least 1");
    }
    if with_transactions && brokers != 1 {
        bail!("--transactions serves one broker only (--brokers 1)");
    }
    let mock = MockCluster::new(brokers).context("cannot start librdkafka's mock cluster")?;
    for spec in topics {
        let (name, partitions) = parse_topic(spec)?;
        mock.create_topic(name, partitions, brokers.min(3)).with_context(|| format!("create topic {name}"))?;
    }
    let mut out = std::io::stdout().lock();
    let bootstrap = match with_transactions {
        false => mock.bootstrap_servers(),
        true => transactions::start(&mock.bootstrap_servers())?,
    };
    writeln!(out, "bootstrap.servers={bootstrap}")?;
    out.flush()?;
    if !control {
        loop {
            std::thread::park();
        }
    }
    for line in std::io::stdin().lock().lines() {
        let line = line.context("reading commands from stdin")?;
        let reply = match command(&mock, brokers, line.trim()) {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("error: {e:#}"),
        };
        writeln!(out, "{reply}")?;
        out.flush()?;
    }
    Ok(())
}

/// A broker id (`1`…) or `all` (-1 for librdkafka).
fn broker_id(arg: Option<&str>, brokers: i32) -> Result<i32> {
    match arg {
        Some("all") => Ok(-1),
        Some(s) => match s.parse::<i32>() {
            Ok(id) if (1..=brokers).contains(&id) => Ok(id),
            _ => bail!("broker {s:?}: expected `all` or an id from 1 to {brokers}"),
        },
        None => bail!("missing broker id"),
    }
}

fn command<C: ClientContext>(mock: &MockCluster<'_, C>, brokers: i32, line: &str) -> Result<()> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["ping"] => Ok(()),
        ["create", name, partitions] => {
            let n: i32 = partitions.parse().context("PARTITIONS must be a number")?;
            mock.create_topic(name, n, brokers.min(3)).with_context(|| format!("create topic {name}"))?;
            Ok(())
        }
        ["down", id] => Ok(mock.broker_down(broker_id(Some(id), brokers)?)?),
        ["up", id] => Ok(mock.broker_up(broker_id(Some(id), brokers)?)?),
        ["errors", api, errors] => {
            let api = api_key(api)?;
            let errors = errors.split(',').map(error_code).collect::<Result<Vec<_>>>()?;
            mock.request_errors(api, &errors);
            Ok(())
        }
        ["rtt", id, ms] => {
            let ms: u64 = ms.parse().context("MS must be a number")?;
            Ok(mock.broker_round_trip_time(broker_id(Some(id), brokers)?, Duration::from_millis(ms))?)
        }
        _ => {
            bail!("unknown command {line:?} (create TOPIC PARTITIONS | down BROKER | up BROKER | rtt BROKER MS | errors API ERROR[,ERROR…] | ping)")
        }
    }
}

/// A protocol API by name, for `errors`.
fn api_key(name: &str) -> Result<RDKafkaApiKey> {
    use RDKafkaApiKey as A;
    Ok(match name {
        "Produce" => A::Produce,
        "Fetch" => A::Fetch,
        "OffsetCommit" => A::OffsetCommit,
        "InitProducerId" => A::InitProducerId,
        "AddPartitionsToTxn" => A::AddPartitionsToTxn,
        "AddOffsetsToTxn" => A::AddOffsetsToTxn,
        "EndTxn" => A::EndTxn,
        "TxnOffsetCommit" => A::TxnOffsetCommit,
        _ => bail!(
            "API {name:?}: expected Produce, Fetch, OffsetCommit, InitProducerId, AddPartitionsToTxn, \
             AddOffsetsToTxn, EndTxn or TxnOffsetCommit"
        ),
    })
}

/// A broker error by its protocol name, for `errors`.
fn error_code(name: &str) -> Result<RDKafkaRespErr> {
    use RDKafkaRespErr as E;
    Ok(match name {
        "NOT_COORDINATOR" => E::RD_KAFKA_RESP_ERR_NOT_COORDINATOR,
        "COORDINATOR_NOT_AVAILABLE" => E::RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE,
        "ILLEGAL_GENERATION" => E::RD_KAFKA_RESP_ERR_ILLEGAL_GENERATION,
        "UNKNOWN_MEMBER_ID" => E::RD_KAFKA_RESP_ERR_UNKNOWN_MEMBER_ID,
        "CONCURRENT_TRANSACTIONS" => E::RD_KAFKA_RESP_ERR_CONCURRENT_TRANSACTIONS,
        "INVALID_PRODUCER_EPOCH" => E::RD_KAFKA_RESP_ERR_INVALID_PRODUCER_EPOCH,
        "PRODUCER_FENCED" => E::RD_KAFKA_RESP_ERR_PRODUCER_FENCED,
        "INVALID_TXN_STATE" => E::RD_KAFKA_RESP_ERR_INVALID_TXN_STATE,
        "NOT_ENOUGH_REPLICAS" => E::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
        "REQUEST_TIMED_OUT" => E::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
        "TRANSPORT" => E::RD_KAFKA_RESP_ERR__TRANSPORT,
        "CLUSTER_AUTHORIZATION_FAILED" => E::RD_KAFKA_RESP_ERR_CLUSTER_AUTHORIZATION_FAILED,
        _ => bail!(
            "error {name:?}: expected NOT_COORDINATOR, COORDINATOR_NOT_AVAILABLE, ILLEGAL_GENERATION, \
             UNKNOWN_MEMBER_ID, CONCURRENT_TRANSACTIONS, INVALID_PRODUCER_EPOCH, PRODUCER_FENCED, INVALID_TXN_STATE, \
             NOT_ENOUGH_REPLICAS, REQUEST_TIMED_OUT, TRANSPORT or CLUSTER_AUTHORIZATION_FAILED"
        ),
    })
}

/// Prints each assignment of the member's topic.
struct Printer {
    /// The subscribed topic.
    topic: String,
}

impl ClientContext for Printer {}

impl ConsumerContext for Printer {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let mut parts: Vec<i32> =
                tpl.elements().iter().filter(|e| e.topic() == self.topic).map(|e| e.partition()).collect();
            parts.sort();
            let list: Vec<String> = parts.iter().map(i32::to_string).collect();
            println!("assigned {}", list.join(","));
            let _ = std::io::stdout().flush();
        }
    }
}

fn member(bootstrap: &str, group: &str, topic: &str, session_timeout_ms: u32) -> Result<()> {
    let consumer: BaseConsumer<Printer> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("session.timeout.ms", session_timeout_ms.to_string())
        .set("heartbeat.interval.ms", (session_timeout_ms / 6).max(100).to_string())
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create_with_context(Printer { topic: topic.to_string() })
        .context("cannot create the consumer")?;
    consumer.subscribe(&[topic]).with_context(|| format!("subscribe to {topic}"))?;
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        std::process::exit(0);
    });
    loop {
        if let Some(Err(e)) = consumer.poll(Duration::from_millis(100)) {
            eprintln!("member: {e}");
        }
    }
}
