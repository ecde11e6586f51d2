//! Matching outputs to sent messages, and the report: pure bookkeeping, no
//! Kafka and no clock of its own, so every rule is unit-tested here.
//!
//! An output is matched to its input by id ([`output_id`]); the first receipt
//! of each message records its latency in an HDR histogram (microseconds, 3
//! significant digits), later ones count as duplicates — another record with
//! the same id, which the worker produced again — or as re-reads: the same
//! record (topic, partition, offset) returned to loadgen's consumer twice,
//! which says something about the broker or the client, not the worker.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Missing ids listed in the report, at most.
const MISSING_SAMPLE: usize = 10;

/// End-to-end latency quantiles, in milliseconds, from an HDR histogram
/// (each value within 0.1 % of the one recorded).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LatencySummary {
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl LatencySummary {
    /// Summary of a histogram of microseconds; `None` when it is empty.
    pub fn from_histogram(micros: &Histogram<u64>) -> Option<Self> {
        if micros.is_empty() {
            return None;
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Some(Self {
            p50_ms: ms(micros.value_at_quantile(0.50)),
            p95_ms: ms(micros.value_at_quantile(0.95)),
            p99_ms: ms(micros.value_at_quantile(0.99)),
            max_ms: ms(micros.max()),
            mean_ms: micros.mean() / 1000.0,
        })
    }
}

/// An empty histogram of latencies in microseconds: 1 µs to 1 hour, 3 significant digits.
fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct LoadgenReport {
    /// Prefix of every id of this run (`<run_id>-<n>`).
    pub run_id: String,
    /// Where the messages were sent.
    pub input_topic: String,
    /// Messages the broker acknowledged on the input topic.
    pub sent: u64,
    /// Of `sent`, the poison messages (expected on the dead-letter topic).
    pub poison: u64,
    /// Messages whose produce failed; not expected anywhere.
    pub send_failed: u64,
    /// Messages of this run received per output topic, duplicates included.
    pub received: BTreeMap<String, u64>,
    /// Sent messages received at least once.
    pub accounted: u64,
    /// Sent messages never received.
    pub missing: u64,
    /// A few of the missing ids, to look for in the worker's logs.
    pub missing_ids: Vec<String>,
    /// Records beyond the first with a message's id (at-least-once redelivery: the worker produced it again).
    pub duplicates: u64,
    /// Records read more than once (the same topic, partition and offset): the broker or loadgen's
    /// consumer returned them again; not counted as received or as duplicates.
    pub rereads: u64,
    /// Messages first received on the wrong kind of topic: poison not on the
    /// dead-letter topic, or a valid message on it.
    pub misrouted: u64,
    /// Messages on the output topics that this run did not send.
    pub foreign: u64,
    /// First send to the last delivery acknowledgement, seconds.
    pub send_seconds: f64,
    /// Achieved send rate: `sent / send_seconds`, messages per second.
    pub send_rate: f64,
    /// First send to the last first receipt, seconds.
    pub end_to_end_seconds: f64,
    /// End-to-end throughput: `accounted / end_to_end_seconds`, messages per second.
    pub throughput: f64,
    /// The first output's receipt to the last first receipt, seconds.
    pub drain_seconds: f64,
    /// How fast the outputs came: `(accounted - 1) / drain_seconds`, messages per second — the
    /// worker's rate once it has started, what `--backlog` reports (0 with fewer than 2 outputs).
    pub drain_throughput: f64,
    /// With `--backlog`: sent messages whose output came back before every send was acknowledged
    /// (0 when the worker was stopped as it should be); absent without it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub received_while_sending: Option<u64>,
    /// Send → receipt by loadgen's consumer (first receipt of each message).
    pub latency: Option<LatencySummary>,
}

impl LoadgenReport {
    /// Whether every sent message came out once or more, on the right kind of topic.
    pub fn ok(&self) -> bool {
        self.missing == 0 && self.misrouted == 0
    }

    /// The report as a table.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let mut line = |l: String| {
            s.push_str(&l);
            s.push('\n');
        };
        line(format!("triagem loadgen — run {}", self.run_id));
        line(String::new());
        line(format!("{:<28} {:>10}", "topic", "messages"));
        line(format!(
            "{:<28} {:>10}  sent ({} poison, {} failed)",
            self.input_topic, self.sent, self.poison, self.send_failed
        ));
        for (topic, n) in &self.received {
            line(format!("{topic:<28} {n:>10}  received"));
        }
        line(String::new());
        line(format!("{:<28} {:>10}", "accounted for", self.accounted));
        line(format!("{:<28} {:>10}", "missing", self.missing));
        line(format!("{:<28} {:>10}", "duplicates", self.duplicates));
        if self.rereads > 0 {
            line(format!("{:<28} {:>10}  (the same records returned again by the broker)", "read twice", self.rereads));
        }
        line(format!("{:<28} {:>10}", "misrouted", self.misrouted));
        line(format!("{:<28} {:>10}", "from other producers", self.foreign));
        line(String::new());
        line(format!("{:<28} {:>10.1} msg/s  ({:.2} s)", "send rate", self.send_rate, self.send_seconds));
        line(format!(
            "{:<28} {:>10.1} msg/s  ({:.2} s)",
            "end-to-end throughput", self.throughput, self.end_to_end_seconds
        ));
        line(format!(
            "{:<28} {:>10.1} msg/s  ({:.2} s, first output to last)",
            "drain rate", self.drain_throughput, self.drain_seconds
        ));
        if let Some(n) = self.received_while_sending {
            line(format!("{:<28} {:>10}  (a backlog run: 0 when the worker waited)", "out before sends done", n));
        }
        match &self.latency {
            Some(l) => line(format!(
                "{:<28} p50 {:.1}  p95 {:.1}  p99 {:.1}  max {:.1}  mean {:.1}",
                "latency ms (send→receipt)", l.p50_ms, l.p95_ms, l.p99_ms, l.max_ms, l.mean_ms
            )),
            None => line(format!("{:<28} no message came back", "latency ms (send→receipt)")),
        }
        if !self.missing_ids.is_empty() {
            line(format!("missing, e.g.: {}", self.missing_ids.join(", ")));
        }
        s
    }
}

/// What happened to one sent message.
#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// Sent; not received yet.
    Pending,
    /// The produce failed.
    Failed,
    /// Received at least once.
    Received,
}

/// One sent message.
#[derive(Debug, Clone)]
struct Slot {
    /// When it was due: its scheduled time at a fixed rate (so a producer
    /// that falls behind shows its delay: no coordinated omission), else the
    /// moment it was handed to the producer.
    sent_at: Instant,
    /// Expected on the dead-letter topic.
    poison: bool,
    /// Pending, failed or received.
    state: State,
}

/// What [`Tracker::receive`] made of a message.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Receipt {
    /// The first receipt of a message of this run.
    First,
    /// Another record of a message of this run seen before.
    Duplicate,
    /// A record read before (same topic, partition and offset).
    Reread,
    /// Not a message of this run.
    Foreign,
}

/// Where a received record is: what tells a record read twice from a message produced twice.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

/// Matches outputs to sent messages by id. Pure bookkeeping: no Kafka, no clock.
#[derive(Debug)]
pub struct Tracker {
    /// `<run_id>-` starts every id of this run.
    prefix: String,
    /// Where poison messages are expected.
    dead_letter_topic: String,
    /// One per sent message; the index is the sequence number in the id.
    slots: Vec<Slot>,
    /// Receipts per output topic.
    received: BTreeMap<String, u64>,
    /// Records beyond the first with a message's id.
    duplicates: u64,
    /// Records of this run read so far: (partition, offset) per topic.
    seen: HashMap<String, HashSet<(i32, i64)>>,
    /// Records read again.
    rereads: u64,
    /// First receipts on the wrong kind of topic.
    misrouted: u64,
    /// Receipts of other producers' messages.
    foreign: u64,
    /// Slots still pending.
    outstanding: u64,
    /// Send (scheduled send at a fixed rate) → first receipt, microseconds.
    latencies_us: Histogram<u64>,
    /// The earliest first receipt.
    first_receipt: Option<Instant>,
    /// The latest first receipt.
    last_receipt: Option<Instant>,
}

impl Tracker {
    /// A tracker for ids `<run_id>-<n>`, counting receipts on `topics`.
    pub fn new(run_id: &str, dead_letter_topic: &str, topics: &[String]) -> Self {
        Self {
            prefix: format!("{run_id}-"),
            dead_letter_topic: dead_letter_topic.to_string(),
            slots: Vec::new(),
            received: topics.iter().map(|t| (t.clone(), 0)).collect(),
            duplicates: 0,
            seen: HashMap::new(),
            rereads: 0,
            misrouted: 0,
            foreign: 0,
            outstanding: 0,
            latencies_us: latency_histogram(),
            first_receipt: None,
            last_receipt: None,
        }
    }

    /// The id of the next message.
    pub fn next_id(&self) -> String {
        format!("{}{}", self.prefix, self.slots.len())
    }

    /// Messages recorded as sent (failed ones included).
    pub fn sent_count(&self) -> u64 {
        self.slots.len() as u64
    }

    /// Records a send due at `at`; returns its sequence number.
    pub fn sent(&mut self, at: Instant, poison: bool) -> u64 {
        self.slots.push(Slot { sent_at: at, poison, state: State::Pending });
        self.outstanding += 1;
        self.slots.len() as u64 - 1
    }

    /// Records that the produce of `seq` failed (unless it came out anyway).
    pub fn failed(&mut self, seq: u64) {
        if let Some(slot) = self.slots.get_mut(seq as usize) {
            if slot.state == State::Pending {
                slot.state = State::Failed;
                self.outstanding -= 1;
            }
        }
    }

    /// The sequence number in `id` when it is an id of this run.
    pub fn sequence(&self, id: &str) -> Option<u64> {
        let n: u64 = id.strip_prefix(&self.prefix)?.parse().ok()?;
        ((n as usize) < self.slots.len()).then_some(n)
    }

    /// Records a message received as `record` at `at` with `id` (see [`output_id`]).
    pub fn receive(&mut self, record: Record<'_>, id: Option<&str>, at: Instant) -> Receipt {
        let topic = record.topic;
        let Some(seq) = id.and_then(|id| self.sequence(id)) else {
            self.foreign += 1;
            return Receipt::Foreign;
        };
        let seen = match self.seen.get_mut(topic) {
            Some(seen) => seen,
            None => self.seen.entry(topic.to_string()).or_default(),
        };
        if !seen.insert((record.partition, record.offset)) {
            self.rereads += 1;
            return Receipt::Reread;
        }
        *self.received.entry(topic.to_string()).or_default() += 1;
        let slot = &mut self.slots[seq as usize];
        if slot.state == State::Received {
            self.duplicates += 1;
            return Receipt::Duplicate;
        }
        if slot.state == State::Pending {
            self.outstanding -= 1;
        }
        slot.state = State::Received;
        if slot.poison != (topic == self.dead_letter_topic) {
            self.misrouted += 1;
        }
        let micros = at.saturating_duration_since(slot.sent_at).as_micros() as u64;
        self.latencies_us.saturating_record(micros.max(1));
        self.first_receipt = Some(self.first_receipt.map_or(at, |t| t.min(at)));
        self.last_receipt = Some(self.last_receipt.map_or(at, |t| t.max(at)));
        Receipt::First
    }

    /// Sent messages received at least once.
    pub fn received_count(&self) -> u64 {
        self.slots.iter().filter(|s| s.state == State::Received).count() as u64
    }

    /// Sent messages neither received nor failed.
    pub fn outstanding(&self) -> u64 {
        self.outstanding
    }

    /// Duplicate receipts so far.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// The ids still pending, the first `limit` of them.
    pub fn missing_ids(&self, limit: usize) -> Vec<String> {
        let pending = self.slots.iter().enumerate().filter(|(_, s)| s.state == State::Pending);
        pending.take(limit).map(|(i, _)| format!("{}{i}", self.prefix)).collect()
    }

    /// The report, given the send start and the last delivery acknowledgement.
    pub(super) fn report(
        &self,
        run_id: &str,
        input_topic: &str,
        started: Instant,
        sends_done: Instant,
    ) -> LoadgenReport {
        let count = |f: &dyn Fn(&Slot) -> bool| self.slots.iter().filter(|s| f(s)).count() as u64;
        let send_failed = count(&|s| s.state == State::Failed);
        let sent = self.slots.len() as u64 - send_failed;
        let accounted = self.received_count();
        let send_seconds = sends_done.saturating_duration_since(started).as_secs_f64();
        let end_to_end_seconds = self.last_receipt.map_or(0.0, |t| t.saturating_duration_since(started).as_secs_f64());
        let drain_seconds = match (self.first_receipt, self.last_receipt) {
            (Some(first), Some(last)) => last.saturating_duration_since(first).as_secs_f64(),
            _ => 0.0,
        };
        let per_second = |n: u64, secs: f64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        LoadgenReport {
            run_id: run_id.to_string(),
            input_topic: input_topic.to_string(),
            sent,
            poison: count(&|s| s.poison && s.state != State::Failed),
            send_failed,
            received: self.received.clone(),
            accounted,
            missing: self.outstanding,
            missing_ids: self.missing_ids(MISSING_SAMPLE),
            duplicates: self.duplicates,
            rereads: self.rereads,
            misrouted: self.misrouted,
            foreign: self.foreign,
            send_seconds,
            send_rate: per_second(sent, send_seconds),
            end_to_end_seconds,
            throughput: per_second(accounted, end_to_end_seconds),
            drain_seconds,
            drain_throughput: per_second(accounted.saturating_sub(1), drain_seconds),
            received_while_sending: None,
            latency: LatencySummary::from_histogram(&self.latencies_us),
        }
    }
}

/// The id of an output: the Kafka key of a dead letter (its value is the
/// original bytes, possibly not JSON); otherwise the `id` field of the JSON
/// value, or the key when it has none.
pub fn output_id<'a>(dead_letter: bool, key: Option<&'a [u8]>, payload: Option<&'a [u8]>) -> Option<Cow<'a, str>> {
    #[derive(Deserialize)]
    struct IdOnly<'a> {
        #[serde(borrow)]
        id: Option<Cow<'a, str>>,
    }
    let from_key = || key.and_then(|k| std::str::from_utf8(k).ok()).map(Cow::Borrowed);
    if dead_letter {
        return from_key();
    }
    payload.and_then(|p| serde_json::from_slice::<IdOnly>(p).ok()).and_then(|v| v.id).or_else(from_key)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn latency_summary_in_milliseconds() {
        let mut h = latency_histogram();
        for us in [4000, 1000, 3000, 2000] {
            h.record(us).unwrap();
        }
        let s = LatencySummary::from_histogram(&h).unwrap();
        let close = |a: f64, b: f64| (a - b).abs() <= b * 0.001;
        assert!(close(s.p50_ms, 2.0) && close(s.p95_ms, 4.0) && close(s.p99_ms, 4.0) && close(s.max_ms, 4.0), "{s:?}");
        assert!(close(s.mean_ms, 2.5), "{s:?}");
        assert_eq!(LatencySummary::from_histogram(&latency_histogram()), None);
    }

    #[test]
    fn latency_quantiles_of_many_values() {
        let mut h = latency_histogram();
        for ms in 1..=100u64 {
            h.record(ms * 1000).unwrap();
        }
        let s = LatencySummary::from_histogram(&h).unwrap();
        let close = |a: f64, b: f64| (a - b).abs() <= b * 0.001;
        assert!(close(s.p50_ms, 50.0) && close(s.p95_ms, 95.0) && close(s.p99_ms, 99.0), "{s:?}");
        assert!(close(s.max_ms, 100.0), "{s:?}");
    }

    /// Record `offset` of `topic`'s partition 0: each call site its own record.
    fn rec(topic: &str, offset: i64) -> Record<'_> {
        Record { topic, partition: 0, offset }
    }

    fn tracker() -> Tracker {
        let topics = ["a.venda", "a.suporte", "a.dlq"].map(String::from);
        Tracker::new("run1", "a.dlq", &topics)
    }

    #[test]
    fn matching_counts_duplicates_foreign_and_misrouted() {
        let mut t = tracker();
        let t0 = Instant::now();
        for i in 0..4 {
            assert_eq!(t.next_id(), format!("run1-{i}"));
            t.sent(t0, i == 3);
        }
        assert_eq!(t.outstanding(), 4);
        let at = t0 + Duration::from_millis(5);
        assert_eq!(t.receive(rec("a.venda", 1), Some("run1-0"), at), Receipt::First);
        assert_eq!(t.receive(rec("a.venda", 2), Some("run1-0"), at), Receipt::Duplicate);
        // The same records again (a broker that returns them twice): neither received nor duplicates.
        assert_eq!(t.receive(rec("a.venda", 1), Some("run1-0"), at), Receipt::Reread);
        assert_eq!(t.receive(rec("a.venda", 2), Some("run1-0"), at), Receipt::Reread);
        // The same offset of another partition or topic is another record.
        let other_partition = Record { partition: 1, ..rec("a.venda", 1) };
        assert_eq!(t.receive(other_partition, Some("run1-0"), at), Receipt::Duplicate);
        assert_eq!(t.receive(rec("a.suporte", 1), Some("run1-0"), at), Receipt::Duplicate);
        assert_eq!(t.receive(rec("a.suporte", 3), Some("run1-1"), at), Receipt::First);
        assert_eq!(t.receive(rec("a.dlq", 4), Some("run1-3"), at), Receipt::First);
        assert_eq!(t.receive(rec("a.venda", 5), Some("run2-2"), at), Receipt::Foreign);
        assert_eq!(t.receive(rec("a.venda", 6), Some("run1-99"), at), Receipt::Foreign);
        assert_eq!(t.receive(rec("a.venda", 7), Some("run1-x"), at), Receipt::Foreign);
        assert_eq!(t.receive(rec("a.venda", 8), None, at), Receipt::Foreign);
        assert_eq!(t.outstanding(), 1);
        assert_eq!(t.missing_ids(10), vec!["run1-2"]);
        let r = t.report("run1", "in", t0, t0 + Duration::from_millis(1));
        assert_eq!((r.sent, r.poison, r.accounted, r.missing, r.duplicates, r.rereads), (4, 1, 3, 1, 3, 2));
        assert_eq!((r.misrouted, r.foreign), (0, 4));
        assert_eq!(r.received["a.venda"], 3);
        assert_eq!(r.received["a.suporte"], 2);
        assert_eq!(r.received["a.dlq"], 1);
        let max_ms = r.latency.as_ref().unwrap().max_ms;
        assert!((max_ms - 5.0).abs() <= 0.005, "{max_ms} ms is not 5 ms within 0.1 %");
        assert!(!r.ok());

        // A valid message on the dead-letter topic is misrouted.
        assert_eq!(t.receive(rec("a.dlq", 9), Some("run1-2"), at), Receipt::First);
        assert_eq!(t.outstanding(), 0);
        let r = t.report("run1", "in", t0, t0 + Duration::from_millis(1));
        assert_eq!((r.missing, r.misrouted), (0, 1));
        assert!(!r.ok());
    }

    #[test]
    fn failed_sends_are_not_missing() {
        let mut t = tracker();
        let t0 = Instant::now();
        t.sent(t0, false);
        t.sent(t0, false);
        t.failed(1);
        t.failed(1);
        assert_eq!(t.outstanding(), 1);
        t.receive(rec("a.venda", 10), Some("run1-0"), t0);
        let r = t.report("run1", "in", t0, t0 + Duration::from_secs(2));
        assert_eq!((r.sent, r.send_failed, r.missing), (1, 1, 0));
        assert_eq!(r.send_rate, 0.5);
        assert!(r.ok());
    }

    #[test]
    fn the_drain_rate_counts_from_the_first_output_to_the_last() {
        let mut t = tracker();
        let t0 = Instant::now();
        for _ in 0..5 {
            t.sent(t0, false);
        }
        let r = t.report("run1", "in", t0, t0);
        assert_eq!((r.drain_seconds, r.drain_throughput), (0.0, 0.0), "nothing received: no rate");
        // Received 10 s after the sends (a worker started late), 4 intervals over 2 s, out of order;
        // a duplicate after the last first receipt does not stretch the span.
        let at = |ms: u64| t0 + Duration::from_millis(10_000 + ms);
        for (i, ms) in [(1, 500), (0, 0), (3, 2000), (2, 1500), (4, 1000)] {
            t.receive(rec("a.venda", i), Some(&format!("run1-{i}")), at(ms));
        }
        t.receive(rec("a.venda", 12), Some("run1-0"), at(9000));
        let r = t.report("run1", "in", t0, t0);
        assert_eq!(r.drain_seconds, 2.0);
        assert_eq!(r.drain_throughput, 2.0, "4 outputs after the first, in 2 s");
        assert_eq!(r.end_to_end_seconds, 12.0);
        assert_eq!(r.received_while_sending, None);
    }

    #[test]
    fn ids_come_from_the_payload_or_the_key() {
        let json = br#"{"id":"run1-7","text":"oi","triagem":{"label":"venda"}}"#;
        assert_eq!(output_id(false, Some(b"k"), Some(json)).as_deref(), Some("run1-7"));
        assert_eq!(output_id(false, Some(b"run1-8"), Some(b"{\"text\":1}")).as_deref(), Some("run1-8"));
        assert_eq!(output_id(false, Some(b"run1-9"), Some(b"\xff")).as_deref(), Some("run1-9"));
        // Dead letters: always the key, whatever the bytes say.
        assert_eq!(output_id(true, Some(b"run1-3"), Some(json)).as_deref(), Some("run1-3"));
        assert_eq!(output_id(true, None, Some(json)), None);
        let escaped = br#"{"id":"run\u0031-2"}"#;
        assert_eq!(output_id(false, None, Some(escaped)).as_deref(), Some("run1-2"));
    }
}
