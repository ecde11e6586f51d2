//! Broker conformance: what the delivery tests take for granted from the broker
//! they run on (the one `TRIAGEM_TEST_BROKER` names; by default
//! `triagem-test-broker`), checked first by scripts/test.sh, so that a broker
//! that loses records fails here, loudly and with what is wrong, instead of
//! making a restart test pass or fail by chance.
//!
//! - A fetch that starts inside a produced batch returns every record from
//!   exactly that offset (every partition, several offsets; produced with
//!   `linger.ms`, in waves, so that each partition has several batches of
//!   many records). tansu 0.6.0 returns records of a later batch instead, or
//!   none at all inside the last batch: see the README's known issues.
//! - A group member SIGKILLed (a separate process) and a new one joining: the
//!   new one gets every partition within the session timeout (plus the
//!   allowance of [`FAILOVER_SLACK`]).
//! - Committed offsets read back as written, from a standalone commit and from
//!   a member of an active group.
//!
//! Checked with rdkafka, and with an independent client (kafka-python, in
//! tests/broker_conformance.py) by `kafka_python_sees_the_same`, which needs
//! `TRIAGEM_PYTHON` (a Python with kafka-python; scripts/test.sh makes a
//! venv). `tansu_conformance` runs every check against tansu:
//!
//! ```sh
//! cargo test --test broker_conformance -- --ignored tansu --nocapture   # fails: tansu skips records
//! ```

mod worker_common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use worker_common::{enqueue, unique, Broker, BrokerKind};

/// Partitions of the checked topic.
const PARTITIONS: i32 = 3;
/// Records produced to it.
const RECORDS: usize = 6000;
/// Records handed to the producer at once (about 167 a partition: one batch each).
const WAVE: usize = 500;
/// Session timeout of the group members of the failover check.
const SESSION_TIMEOUT: Duration = Duration::from_secs(6);
/// What the failover may take beyond the session timeout. Apache Kafka
/// expires the killed member after one session timeout and completes the
/// rebalance right away; librdkafka's mock cluster first waits one session
/// timeout minus 1 s for the members to rejoin, elects, finds the killed member
/// missing at sync and rebalances again (11 s in all with a 6 s session
/// timeout). One more session timeout and 3 s of round trips allow both,
/// and still fail a broker that never hands the partitions over.
const FAILOVER_SLACK: Duration = Duration::from_secs(9);

/// Keys of the records produced to each partition, by offset.
type Expected = HashMap<i32, Vec<String>>;

/// Fails with every problem found, or prints what was checked.
fn verdict(broker: &Broker, check: &str, problems: Vec<String>) {
    assert!(
        problems.is_empty(),
        "the {:?} broker at {} FAILS broker conformance ({check}); tests of restarts, revokes and rebalances would \
         prove nothing on it:\n  - {}",
        broker.kind,
        broker.addr,
        problems.join("\n  - ")
    );
    println!("broker conformance, {check}: the {:?} broker at {} conforms", broker.kind, broker.addr);
}

/// Creates `topic` and produces [`RECORDS`] keyed records, spread over the
/// partitions, in waves of [`WAVE`] handed to the producer at once with
/// `linger.ms` 50, so that each partition gets several batches of many
/// records. Returns the keys by partition and offset.
async fn produce_batches(broker: &Broker, topic: &str) -> Result<Expected, String> {
    broker.create_topic(topic, PARTITIONS).await;
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &broker.addr)
        .set("linger.ms", "50")
        .set("message.timeout.ms", "30000")
        .create()
        .expect("producer");
    let started = Instant::now();
    let keys: Vec<String> = (0..RECORDS).map(|i| format!("k-{i}")).collect();
    let mut placed: HashMap<i32, Vec<(i64, String)>> = HashMap::new();
    // In waves, each handed to the producer at once: every wave makes at least
    // one batch per partition, and a batch holds many records.
    for (w, wave) in keys.chunks(WAVE).enumerate() {
        let sends: Vec<_> = wave
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let partition = (w * WAVE + i) as i32 % PARTITIONS;
                enqueue(&p, FutureRecord::to(topic).key(k).payload(k).partition(partition))
            })
            .collect();
        for (send, key) in sends.into_iter().zip(wave) {
            let d = send.await.expect("producer dropped").map_err(|(e, _)| format!("produce {key}: {e}"))?;
            placed.entry(d.partition).or_default().push((d.offset, key.clone()));
        }
    }
    println!(
        "produced {RECORDS} records to {topic} ({PARTITIONS} partitions) in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let mut expected = Expected::new();
    for (partition, mut records) in placed {
        records.sort();
        for (i, (offset, key)) in records.iter().enumerate() {
            if *offset != i as i64 {
                return Err(format!("produce: partition {partition}: record {key} got offset {offset}, expected {i}"));
            }
        }
        expected.insert(partition, records.into_iter().map(|(_, k)| k).collect());
    }
    Ok(expected)
}

/// Offsets to seek to in a partition of `len` records: all but the first are
/// inside a multi-record batch.
fn seek_targets(len: usize) -> Vec<i64> {
    let mut t = vec![1, 7, len as i64 / 3 + 1, len as i64 / 2 + 3, len as i64 - 2];
    t.retain(|o| *o > 0 && *o < len as i64);
    t.sort();
    t.dedup();
    t
}

/// Assigns each partition at several offsets and reads to the end: the first
/// record must be at the offset asked for, and every record must follow in order.
fn check_seeks(broker: &Broker, topic: &str, expected: &Expected) -> Vec<String> {
    let mut problems = Vec::new();
    let mut partitions: Vec<i32> = expected.keys().copied().collect();
    partitions.sort();
    for partition in partitions {
        let keys = &expected[&partition];
        for from in seek_targets(keys.len()) {
            let result = read_from(broker, topic, partition, from, keys);
            println!("rdkafka: partition {partition}: seek to offset {from}: {result:?}");
            if let Err(p) = result {
                problems.push(format!("rdkafka: partition {partition}: seek to offset {from}: {p}"));
            }
        }
    }
    problems
}

fn read_from(broker: &Broker, topic: &str, partition: i32, from: i64, keys: &[String]) -> Result<(), String> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.addr)
        .set("group.id", unique("conformance-reader"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "50")
        .create()
        .expect("reader");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(from)).unwrap();
    c.assign(&tpl).unwrap();
    let end = keys.len() as i64;
    let mut next = from;
    let deadline = Instant::now() + Duration::from_secs(10);
    while next < end {
        if Instant::now() > deadline {
            return Err(format!("only offsets {from}..{next} of {from}..{end} arrived within 10 s"));
        }
        let m = match c.poll(Duration::from_millis(200)) {
            None => continue,
            Some(Err(e)) => return Err(format!("fetch error: {e}")),
            Some(Ok(m)) => m,
        };
        let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default();
        if m.offset() != next {
            let what = if next == from { "the first record returned" } else { "the next record" };
            return Err(format!(
                "{what} is at offset {} instead of {next} ({} records skipped; key {key:?})",
                m.offset(),
                m.offset() - next
            ));
        }
        if key != keys[next as usize] {
            return Err(format!("offset {next} holds key {key:?}, but {:?} was produced there", keys[next as usize]));
        }
        next += 1;
    }
    Ok(())
}

/// A `triagem-test-broker member` process of `group`; its assignments come on the channel.
fn spawn_member(broker: &Broker, group: &str, topic: &str) -> (std::process::Child, mpsc::Receiver<Vec<i32>>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_triagem-test-broker"))
        .args(["member", "--bootstrap", &broker.addr, "--group", group, "--topic", topic])
        .args(["--session-timeout-ms", &SESSION_TIMEOUT.as_millis().to_string()])
        // Kept open by the `Child`: the member exits if this test process dies.
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run triagem-test-broker member");
    let out = BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            if let Some(list) = line.strip_prefix("assigned ") {
                let parts = list.split(',').filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect();
                if tx.send(parts).is_err() {
                    break;
                }
            }
        }
    });
    (child, rx)
}

fn group_member(broker: &Broker, group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", &broker.addr)
        .set("group.id", group)
        .set("session.timeout.ms", SESSION_TIMEOUT.as_millis().to_string())
        .set("heartbeat.interval.ms", "1000")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("group member")
}

/// A member in its own process gets every partition, is SIGKILLed, and a new
/// member joining gets every partition within the session timeout; that
/// member's commits read back as written.
fn check_failover(broker: &Broker, topic: &str, expected: &Expected) -> Vec<String> {
    let mut problems = Vec::new();
    let all: Vec<i32> = (0..PARTITIONS).collect();
    let group = unique("conformance-failover");
    let (mut first, assignments) = spawn_member(broker, &group, topic);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = Vec::new();
    while got != all && Instant::now() < deadline {
        if let Ok(a) = assignments.recv_timeout(Duration::from_millis(200)) {
            got = a;
        }
    }
    if got != all {
        let _ = first.kill();
        let _ = first.wait();
        return vec![format!("group: the only member of a new group got partitions {got:?} of {all:?} in 30 s")];
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let killed = Instant::now();

    let second = group_member(broker, &group);
    second.subscribe(&[topic]).unwrap();
    let limit = SESSION_TIMEOUT + FAILOVER_SLACK;
    let mut owned = Vec::new();
    while Instant::now() < killed + limit + Duration::from_secs(30) {
        if let Some(Err(e)) = second.poll(Duration::from_millis(100)) {
            eprintln!("member: {e}");
        }
        owned = second.assignment().map(|a| a.elements().iter().map(|e| e.partition()).collect()).unwrap_or_default();
        owned.sort();
        if owned == all {
            break;
        }
    }
    let took = killed.elapsed();
    println!("group: after SIGKILL of the member, a new member had every partition after {:.1} s", took.as_secs_f64());
    if owned != all {
        problems.push(format!(
            "group: {:.0} s after the only member was SIGKILLed, a new member still has partitions {owned:?} of \
             {all:?} (session timeout {} s)",
            took.as_secs_f64(),
            SESSION_TIMEOUT.as_secs()
        ));
        return problems;
    }
    if took > limit {
        problems.push(format!(
            "group: a new member got the partitions of a SIGKILLed one after {:.1} s, more than the session timeout \
             ({} s) + {} s",
            took.as_secs_f64(),
            SESSION_TIMEOUT.as_secs(),
            FAILOVER_SLACK.as_secs()
        ));
    }
    // A member of an active group commits; another client reads the offsets back.
    let written: Vec<(i32, i64)> = all.iter().map(|p| (*p, expected[p].len() as i64 / 2 + *p as i64)).collect();
    problems.extend(commit_and_read_back(broker, &second, &group, topic, &written, "the active member's commit"));
    problems
}

/// Commits `written` with `committer` and reads them back with a new consumer of `group`.
fn commit_and_read_back(
    broker: &Broker,
    committer: &BaseConsumer,
    group: &str,
    topic: &str,
    written: &[(i32, i64)],
    what: &str,
) -> Vec<String> {
    let mut tpl = TopicPartitionList::new();
    for (p, o) in written {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*o)).unwrap();
    }
    if let Err(e) = committer.commit(&tpl, CommitMode::Sync) {
        return vec![format!("commit: {what}: {e}")];
    }
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.addr)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut ask = TopicPartitionList::new();
    for (p, _) in written {
        ask.add_partition(topic, *p);
    }
    let got = match reader.committed_offsets(ask, Duration::from_secs(10)) {
        Ok(got) => got,
        Err(e) => return vec![format!("commit: {what}: reading the offsets back: {e}")],
    };
    let mut problems = Vec::new();
    for (p, o) in written {
        let back = got.find_partition(topic, *p).map(|e| e.offset());
        if back != Some(Offset::Offset(*o)) {
            problems.push(format!("commit: {what}: partition {p}: wrote offset {o}, read back {back:?}"));
        }
    }
    problems
}

/// Standalone commits (no active member), written twice, read back each time.
fn check_commits(broker: &Broker, topic: &str) -> Vec<String> {
    let group = unique("conformance-commits");
    let committer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.addr)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut problems = Vec::new();
    for round in 0..2i64 {
        let written: Vec<(i32, i64)> = (0..PARTITIONS).map(|p| (p, 11 + 100 * round + 7 * p as i64)).collect();
        let what = format!("standalone commit #{}", round + 1);
        problems.extend(commit_and_read_back(broker, &committer, &group, topic, &written, &what));
    }
    problems
}

/// Runs tests/broker_conformance.py with `python` (kafka-python): the same
/// checks with a client that shares no code with librdkafka.
fn check_with_kafka_python(broker: &Broker, python: &str, topic: &str, expected: &Expected) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("expected.json");
    std::fs::write(&file, serde_json::to_string(expected).unwrap()).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/broker_conformance.py");
    let out = Command::new(python)
        .arg(script)
        .args(["--bootstrap", &broker.addr, "--topic", topic, "--expected"])
        .arg(&file)
        .args(["--group", &unique("conformance-py"), "--session-timeout-ms"])
        .arg(SESSION_TIMEOUT.as_millis().to_string())
        .args(["--failover-slack-ms", &FAILOVER_SLACK.as_millis().to_string()])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python} {script}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    let mut problems: Vec<String> =
        stdout.lines().filter_map(|l| l.strip_prefix("PROBLEM ")).map(|p| format!("kafka-python: {p}")).collect();
    if !out.status.success() && problems.is_empty() {
        problems.push(format!(
            "kafka-python: the script failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    problems
}

/// The Python to run the kafka-python check with.
fn python() -> String {
    std::env::var("TRIAGEM_PYTHON").unwrap_or_else(|_| {
        panic!(
            "set TRIAGEM_PYTHON to a Python with kafka-python (scripts/test.sh makes one: \
             python3 -m venv target/test-venv && target/test-venv/bin/pip install kafka-python)"
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_inside_a_batch_returns_every_record_from_there() {
    let broker = Broker::start().await;
    let topic = unique("conformance-seek");
    let expected = produce_batches(&broker, &topic).await.unwrap_or_else(|e| panic!("{e}"));
    let problems = tokio::task::spawn_blocking(move || {
        let p = check_seeks(&broker, &topic, &expected);
        (broker, p)
    })
    .await
    .unwrap();
    verdict(&problems.0, "seek inside batches", problems.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_members_partitions_go_to_a_new_member_within_the_session_timeout() {
    let broker = Broker::start().await;
    let topic = unique("conformance-group");
    let expected = produce_batches(&broker, &topic).await.unwrap_or_else(|e| panic!("{e}"));
    let (broker, problems) = tokio::task::spawn_blocking(move || {
        let p = check_failover(&broker, &topic, &expected);
        (broker, p)
    })
    .await
    .unwrap();
    verdict(&broker, "SIGKILLed member, new member", problems);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_offsets_read_back_as_written() {
    let broker = Broker::start().await;
    let topic = unique("conformance-commit");
    broker.create_topic(&topic, PARTITIONS).await;
    let (broker, problems) = tokio::task::spawn_blocking(move || {
        let p = check_commits(&broker, &topic);
        (broker, p)
    })
    .await
    .unwrap();
    verdict(&broker, "committed offsets", problems);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs kafka-python: scripts/test.sh runs it with a venv (TRIAGEM_PYTHON)"]
async fn kafka_python_sees_the_same() {
    let python = python();
    let broker = Broker::start().await;
    let topic = unique("conformance-py");
    let expected = produce_batches(&broker, &topic).await.unwrap_or_else(|e| panic!("{e}"));
    let (broker, problems) = tokio::task::spawn_blocking(move || {
        let p = check_with_kafka_python(&broker, &python, &topic, &expected);
        (broker, p)
    })
    .await
    .unwrap();
    verdict(&broker, "kafka-python", problems);
}

/// Every check against tansu (scripts/install-tansu.sh), kafka-python's too
/// when `TRIAGEM_PYTHON` is set. Fails today: see the README's known issues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "tansu 0.6.0 fails it (skips records after a seek inside a batch); needs scripts/install-tansu.sh"]
async fn tansu_conformance() {
    let broker = Broker::start_kind(BrokerKind::Tansu).await;
    let topic = unique("conformance-tansu");
    let expected = produce_batches(&broker, &topic).await.unwrap_or_else(|e| panic!("{e}"));
    let (broker, problems) = tokio::task::spawn_blocking(move || {
        let mut p = check_seeks(&broker, &topic, &expected);
        p.extend(check_failover(&broker, &topic, &expected));
        p.extend(check_commits(&broker, &topic));
        if let Ok(python) = std::env::var("TRIAGEM_PYTHON") {
            p.extend(check_with_kafka_python(&broker, &python, &topic, &expected));
        }
        (broker, p)
    })
    .await
    .unwrap();
    verdict(&broker, "all checks", problems);
}
