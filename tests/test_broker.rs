//! `triagem-test-broker`, the tool the delivery tests stand on: topics from
//! its arguments, its address on the first line, the control channel's
//! commands (create, down/up, errors named), and no process left behind when
//! the test that started it goes away.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

fn partitions(addr: &str, topic: &str, timeout: Duration) -> Result<usize, String> {
    let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", addr).create().unwrap();
    let md = c.fetch_metadata(Some(topic), timeout).map_err(|e| e.to_string())?;
    Ok(md.topics().iter().find(|t| t.name() == topic).map_or(0, |t| t.partitions().len()))
}

#[test]
fn serves_topics_from_its_arguments_obeys_commands_and_exits_when_stdin_closes() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_triagem-test-broker"))
        .args(["serve", "--topic", "orders:3", "--topic", "out:1", "--control"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("bootstrap.servers=").unwrap_or_else(|| panic!("first line {line:?}"));
    let addr = addr.to_string();
    let mut ask = |cmd: &str| -> String {
        writeln!(stdin, "{cmd}").unwrap();
        let mut reply = String::new();
        stdout.read_line(&mut reply).unwrap();
        reply.trim().to_string()
    };

    assert_eq!(partitions(&addr, "orders", Duration::from_secs(10)), Ok(3));
    assert_eq!(partitions(&addr, "out", Duration::from_secs(10)), Ok(1));
    assert_eq!(ask("create later 2"), "ok");
    assert_eq!(partitions(&addr, "later", Duration::from_secs(10)), Ok(2));
    assert_eq!(ask("ping"), "ok");
    assert!(ask("launch rockets").starts_with("error: unknown command"), "an unknown command is an error");
    assert!(ask("down 7").starts_with("error: broker \"7\""), "a broker that does not exist is an error");
    assert_eq!(ask("errors EndTxn NOT_COORDINATOR,CONCURRENT_TRANSACTIONS"), "ok");
    assert!(ask("errors Launch NOT_COORDINATOR").starts_with("error: API \"Launch\""), "an unknown API is an error");
    assert!(ask("errors EndTxn OOPS").starts_with("error: error \"OOPS\""), "an unknown error is an error");

    assert_eq!(ask("down all"), "ok");
    assert!(partitions(&addr, "orders", Duration::from_secs(2)).is_err(), "a broker that is down answers nothing");
    assert_eq!(ask("up all"), "ok");
    assert_eq!(partitions(&addr, "orders", Duration::from_secs(20)), Ok(3));

    drop(stdin);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the test broker kept running after its stdin closed");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_bad_topic_argument_is_one_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_triagem-test-broker"))
        .args(["serve", "--topic", "orders"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--topic \"orders\": expected NAME:PARTITIONS"), "{err}");
}
