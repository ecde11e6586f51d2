//! `serve --transactions`: what librdkafka's mock cluster leaves out of
//! Kafka transactions, added by a protocol layer in front of it. Clients
//! connect to this layer; every request goes on to the mock broker and every
//! response comes back through it, unchanged except for these:
//!
//! - **Fencing**: when `InitProducerId` gives a `transactional.id` a new
//!   producer id, the previous one is fenced and its open transaction aborted.
//!   A fenced producer's `Produce`, `AddPartitionsToTxn`, `AddOffsetsToTxn`,
//!   `TxnOffsetCommit` and `EndTxn` reach the mock with a wrong epoch, so the
//!   mock answers `INVALID_PRODUCER_EPOCH` (librdkafka: fenced, fatal). The
//!   mock alone gives the second producer a new id and lets both write.
//! - **Offsets in a transaction**: `TxnOffsetCommit` is held per producer and,
//!   once its `EndTxn` commits, becomes the group's committed offset — kept
//!   here and given in `OffsetFetch` answers (until a plain `OffsetCommit` of
//!   the same partition succeeds), whatever the group's state by then, as
//!   Kafka materialises a transaction's offsets with its commit marker; an
//!   abort drops it. The mock alone acknowledges it and stores nothing.
//! - **`read_committed`**: the batches each transactional `Produce` appended
//!   are remembered with their producer; `EndTxn` marks them committed or
//!   aborted. A `Fetch` at `isolation.level = read_committed` gets no record
//!   at or after a partition's first open transaction (the last stable
//!   offset), and an aborted batch comes back emptied (its offsets, no
//!   records, flagged as a control batch), so the reader moves past it. The mock alone
//!   writes no markers and returns every record.
//!
//! One mock broker only; `Metadata` and `FindCoordinator` answers name this
//! layer's address instead of the mock's.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::{
    AddOffsetsToTxnRequest, AddPartitionsToTxnRequest, ApiKey, EndTxnRequest, FetchRequest, FetchResponse,
    FindCoordinatorResponse, InitProducerIdRequest, InitProducerIdResponse, MetadataResponse, OffsetCommitRequest,
    ProduceRequest, ProduceResponse, RequestHeader, ResponseHeader, TxnOffsetCommitRequest,
};
use kafka_protocol::messages::{EndTxnResponse, OffsetCommitResponse, OffsetFetchRequest, OffsetFetchResponse};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};

/// What became of a transactional batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Txn {
    Open,
    Committed,
    Aborted,
}

/// One batch a transactional producer appended.
#[derive(Debug, Clone, Copy)]
struct Batch {
    /// The producer id that wrote it.
    pid: i64,
    /// Its transaction's outcome so far.
    txn: Txn,
}

/// Offsets a producer's open transaction will commit for a group.
#[derive(Debug, Clone)]
struct HeldOffsets {
    group: String,
    /// (topic, partition) → (offset, metadata)
    offsets: BTreeMap<(String, i32), (i64, Option<String>)>,
}

/// What the layer knows of the transactions.
#[derive(Debug, Default)]
struct State {
    /// `transactional.id` → its current producer id.
    current: HashMap<String, i64>,
    /// Producer ids a newer one with the same `transactional.id` fenced.
    fenced: HashSet<i64>,
    /// Offsets held per producer id until its transaction ends.
    held: HashMap<i64, Vec<HeldOffsets>>,
    /// Per partition, transactional batches by base offset.
    batches: HashMap<(String, i32), BTreeMap<i64, Batch>>,
    /// Topic ids (Fetch v13+) → names, from Metadata answers.
    names: HashMap<[u8; 16], String>,
    /// Offsets committed by transactions: (group, topic, partition) → (offset, metadata).
    committed: HashMap<(String, String, i32), (i64, Option<String>)>,
}

impl State {
    /// Ends every open batch of `pid`.
    fn end(&mut self, pid: i64, txn: Txn) {
        for batches in self.batches.values_mut() {
            for b in batches.values_mut() {
                if b.pid == pid && b.txn == Txn::Open {
                    b.txn = txn;
                }
            }
        }
    }

    /// The first offset of the partition's first open transaction.
    fn last_stable(&self, tp: &(String, i32)) -> Option<i64> {
        self.batches.get(tp)?.iter().find(|(_, b)| b.txn == Txn::Open).map(|(base, _)| *base)
    }
}

/// The layer: its state, and the mock broker behind it.
pub struct Layer {
    state: Mutex<State>,
    /// The mock broker's address.
    upstream: String,
    /// This layer's address, given to clients in Metadata and FindCoordinator answers.
    host: String,
    port: i32,
}

/// Serves the layer for the mock broker at `upstream`; returns its address.
pub fn start(upstream: &str) -> Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").context("bind the transaction layer")?;
    let addr = listener.local_addr()?;
    let layer = Arc::new(Layer {
        state: Mutex::default(),
        upstream: upstream.to_string(),
        host: addr.ip().to_string(),
        port: addr.port() as i32,
    });
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let layer = layer.clone();
            std::thread::spawn(move || {
                if let Err(e) = layer.connection(client) {
                    // A client closing its connection ends up here too.
                    let text = format!("{e:#}");
                    if !text.contains("closed") {
                        eprintln!("transaction layer: {text}");
                    }
                }
            });
        }
    });
    Ok(addr.to_string())
}

fn read_frame(s: &mut TcpStream) -> Result<Bytes> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).context("connection closed")?;
    let mut buf = vec![0u8; i32::from_be_bytes(len).max(0) as usize];
    s.read_exact(&mut buf).context("connection closed")?;
    Ok(Bytes::from(buf))
}

/// Writes one size-prefixed frame in one write (with Nagle's algorithm off:
/// a request answered before the next is read must not wait for an ACK).
fn write_frame(s: &mut TcpStream, frame: &[u8]) -> Result<()> {
    let mut buf = Vec::with_capacity(frame.len() + 4);
    buf.extend_from_slice(&(frame.len() as i32).to_be_bytes());
    buf.extend_from_slice(frame);
    s.write_all(&buf)?;
    Ok(())
}

/// What a request needs remembered for its response.
enum Pending {
    Raw,
    InitProducerId(String),
    EndTxn {
        pid: i64,
        committed: bool,
    },
    /// Per partition of a transactional Produce: (topic, partition, pid, record offsets per batch).
    Produce(Vec<(String, i32, i64, Vec<i64>)>),
    Fetch,
    Metadata,
    FindCoordinator,
    /// A plain commit of the group: it replaces what transactions committed.
    OffsetCommit(String),
    /// A read of the group's committed offsets.
    OffsetFetch(String),
}

fn encode_request<T: Encodable + HeaderVersion>(header: &RequestHeader, body: &T, version: i16) -> Result<Bytes> {
    let mut buf = BytesMut::new();
    header.encode(&mut buf, T::header_version(version))?;
    body.encode(&mut buf, version)?;
    Ok(buf.freeze())
}

fn encode_response<T: Encodable>(header: &ResponseHeader, hv: i16, body: &T, version: i16) -> Result<Bytes> {
    let mut buf = BytesMut::new();
    header.encode(&mut buf, hv)?;
    body.encode(&mut buf, version)?;
    Ok(buf.freeze())
}

/// The producer id and epoch of a v2 record batch, and the offset of its epoch field.
const PID_AT: usize = 43;
const EPOCH_AT: usize = 51;
const ATTRIBUTES_AT: usize = 21;
const LAST_DELTA_AT: usize = 23;
const RECORDS_AT: usize = 61;

/// Each v2 batch in `records`: (start, length).
fn batches(records: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + RECORDS_AT <= records.len() {
        let len = i32::from_be_bytes(records[at + 8..at + 12].try_into().unwrap()) as usize + 12;
        if at + len > records.len() || records[at + 16] != 2 {
            break;
        }
        out.push((at, len));
        at += len;
    }
    out
}

fn be_i64(b: &[u8], at: usize) -> i64 {
    i64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn be_i32(b: &[u8], at: usize) -> i32 {
    i32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

/// Recomputes a batch's CRC-32C (over everything from its attributes on).
fn fix_crc(batch: &mut [u8]) {
    let crc = crc32c::crc32c(&batch[ATTRIBUTES_AT..]);
    batch[17..21].copy_from_slice(&crc.to_be_bytes());
}

/// A batch with its offsets and no records (what compaction leaves), marked
/// a control batch: a reader skips it, and librdkafka does not take a fetch
/// that yields no message but this for a message too large to fit.
fn emptied(batch: &[u8]) -> Vec<u8> {
    let mut b = batch[..RECORDS_AT].to_vec();
    b[8..12].copy_from_slice(&((RECORDS_AT - 12) as i32).to_be_bytes());
    // No compression (there is nothing to decompress); the control bit.
    let attributes = (i16::from_be_bytes([b[21], b[22]]) & !0x07) | 0x20;
    b[21..23].copy_from_slice(&attributes.to_be_bytes());
    b[57..61].copy_from_slice(&0i32.to_be_bytes());
    fix_crc(&mut b);
    b
}

impl Layer {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One client connection: requests one at a time, each answered before the next is read.
    fn connection(&self, mut client: TcpStream) -> Result<()> {
        let mut upstream = TcpStream::connect(&self.upstream).context("connect to the mock broker")?;
        client.set_nodelay(true)?;
        upstream.set_nodelay(true)?;
        loop {
            let request = read_frame(&mut client)?;
            let (request, pending, expects_answer) = match self.on_request(request.clone()) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("transaction layer: request passed on as it is: {e:#}");
                    (request, Pending::Raw, true)
                }
            };
            write_frame(&mut upstream, &request)?;
            if !expects_answer {
                continue;
            }
            let response = read_frame(&mut upstream)?;
            let (api, version) =
                (i16::from_be_bytes([request[0], request[1]]), i16::from_be_bytes([request[2], request[3]]));
            let response = match self.on_response(api, version, pending, response.clone()) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("transaction layer: response passed on as it is: {e:#}");
                    response
                }
            };
            write_frame(&mut client, &response)?;
        }
    }

    /// Looks at (and may rewrite) a request.
    fn on_request(&self, frame: Bytes) -> Result<(Bytes, Pending, bool)> {
        let api = i16::from_be_bytes([frame[0], frame[1]]);
        let version = i16::from_be_bytes([frame[2], frame[3]]);
        let Ok(key) = ApiKey::try_from(api) else { return Ok((frame, Pending::Raw, true)) };
        let mut buf = frame.clone();
        let header_version = key.request_header_version(version);
        let pending = match key {
            ApiKey::Metadata => Pending::Metadata,
            ApiKey::FindCoordinator => Pending::FindCoordinator,
            ApiKey::OffsetCommit => {
                let _ = RequestHeader::decode(&mut buf, header_version)?;
                Pending::OffsetCommit(OffsetCommitRequest::decode(&mut buf, version)?.group_id.0.to_string())
            }
            ApiKey::OffsetFetch if version <= 7 => {
                let _ = RequestHeader::decode(&mut buf, header_version)?;
                Pending::OffsetFetch(OffsetFetchRequest::decode(&mut buf, version)?.group_id.0.to_string())
            }
            ApiKey::Fetch => {
                let header = RequestHeader::decode(&mut buf, header_version)?;
                let _ = header;
                let r = FetchRequest::decode(&mut buf, version)?;
                if r.isolation_level == 1 {
                    Pending::Fetch
                } else {
                    Pending::Raw
                }
            }
            ApiKey::InitProducerId => {
                let header = RequestHeader::decode(&mut buf, header_version)?;
                let r = InitProducerIdRequest::decode(&mut buf, version)?;
                let _ = header;
                match r.transactional_id {
                    Some(id) => Pending::InitProducerId(id.0.to_string()),
                    None => Pending::Raw,
                }
            }
            ApiKey::Produce => {
                let header = RequestHeader::decode(&mut buf, header_version)?;
                let mut r = ProduceRequest::decode(&mut buf, version)?;
                if r.transactional_id.is_none() {
                    return Ok((frame, Pending::Raw, true));
                }
                let expects_answer = r.acks != 0;
                let mut seen = Vec::new();
                let mut rewritten = false;
                let state = self.lock();
                for topic in &mut r.topic_data {
                    for p in &mut topic.partition_data {
                        let Some(records) = &p.records else { continue };
                        let mut bytes = records.to_vec();
                        let mut counts = Vec::new();
                        let mut pid = -1;
                        for (at, len) in batches(&bytes) {
                            pid = be_i64(&bytes, at + PID_AT);
                            counts.push(be_i32(&bytes, at + LAST_DELTA_AT) as i64 + 1);
                            if state.fenced.contains(&pid) {
                                let epoch = i16::from_be_bytes([bytes[at + EPOCH_AT], bytes[at + EPOCH_AT + 1]]);
                                let wrong = epoch.wrapping_sub(1000);
                                bytes[at + EPOCH_AT..at + EPOCH_AT + 2].copy_from_slice(&wrong.to_be_bytes());
                                fix_crc(&mut bytes[at..at + len]);
                                rewritten = true;
                            }
                        }
                        if rewritten {
                            p.records = Some(Bytes::from(bytes));
                        }
                        seen.push((topic.name.0.to_string(), p.index, pid, counts));
                    }
                }
                drop(state);
                let frame = if rewritten { encode_request(&header, &r, version)? } else { frame };
                return Ok((frame, Pending::Produce(seen), expects_answer));
            }
            ApiKey::AddPartitionsToTxn if version <= 3 => {
                let header = RequestHeader::decode(&mut buf, header_version)?;
                let mut r = AddPartitionsToTxnRequest::decode(&mut buf, version)?;
                if self.lock().fenced.contains(&r.v3_and_below_producer_id.0) {
                    r.v3_and_below_producer_epoch = r.v3_and_below_producer_epoch.wrapping_sub(1000);
                    return Ok((encode_request(&header, &r, version)?, Pending::Raw, true));
                }
                Pending::Raw
            }
            ApiKey::AddOffsetsToTxn => {
                let header = RequestHeader::decode(&mut buf, header_version)?;
                let mut r = AddOffsetsToTxnRequest::decode(&mut buf, version)?;
                if self.lock().fenced.contains(&r.producer_id.0) {
                    r.producer_epoch = r.producer_epoch.wrapping_sub(1000);
                    return Ok((encode_request(&header, &r, version)?, Pending::Raw, true));
                }
                Pending::Raw
            }
            ApiKey::TxnOffsetCommit => {
                let header = RequestHeader::decode(&mut buf, header_version)?;
                let mut r = TxnOffsetCommitRequest::decode(&mut buf, version)?;
                let pid = r.producer_id.0;
                let mut state = self.lock();
                if state.fenced.contains(&pid) {
                    r.producer_epoch = r.producer_epoch.wrapping_sub(1000);
                    return Ok((encode_request(&header, &r, version)?, Pending::Raw, true));
                }
                let mut held = HeldOffsets { group: r.group_id.0.to_string(), offsets: BTreeMap::new() };
                for t in &r.topics {
                    for p in &t.partitions {
                        held.offsets.insert(
                            (t.name.0.to_string(), p.partition_index),
                            (p.committed_offset, p.committed_metadata.as_ref().map(|s| s.to_string())),
                        );
                    }
                }
                state.held.entry(pid).or_default().push(held);
                Pending::Raw
            }
            ApiKey::EndTxn => {
                let header = RequestHeader::decode(&mut buf, header_version)?;
                let mut r = EndTxnRequest::decode(&mut buf, version)?;
                let pid = r.producer_id.0;
                if self.lock().fenced.contains(&pid) {
                    r.producer_epoch = r.producer_epoch.wrapping_sub(1000);
                    return Ok((encode_request(&header, &r, version)?, Pending::Raw, true));
                }
                Pending::EndTxn { pid, committed: r.committed }
            }
            _ => Pending::Raw,
        };
        Ok((frame, pending, true))
    }

    /// Looks at (and may rewrite) the response to a request.
    fn on_response(&self, api: i16, version: i16, pending: Pending, frame: Bytes) -> Result<Bytes> {
        let key = ApiKey::try_from(api).map_err(|_| anyhow::anyhow!("unknown API {api}"))?;
        let hv = key.response_header_version(version);
        let mut buf = frame.clone();
        match pending {
            Pending::Raw => Ok(frame),
            Pending::Metadata => {
                let header = ResponseHeader::decode(&mut buf, hv)?;
                let mut r = MetadataResponse::decode(&mut buf, version)?;
                for b in &mut r.brokers {
                    b.host = StrBytes::from_string(self.host.clone());
                    b.port = self.port;
                }
                let mut state = self.lock();
                for t in &r.topics {
                    if let Some(name) = &t.name {
                        state.names.insert(*t.topic_id.as_bytes(), name.0.to_string());
                    }
                }
                encode_response(&header, hv, &r, version)
            }
            Pending::FindCoordinator => {
                let header = ResponseHeader::decode(&mut buf, hv)?;
                let mut r = FindCoordinatorResponse::decode(&mut buf, version)?;
                r.host = StrBytes::from_string(self.host.clone());
                r.port = self.port;
                for c in &mut r.coordinators {
                    c.host = StrBytes::from_string(self.host.clone());
                    c.port = self.port;
                }
                encode_response(&header, hv, &r, version)
            }
            Pending::InitProducerId(id) => {
                let header = ResponseHeader::decode(&mut buf, hv)?;
                let r = InitProducerIdResponse::decode(&mut buf, version)?;
                let _ = header;
                if r.error_code == 0 {
                    let mut state = self.lock();
                    let pid = r.producer_id.0;
                    // A new registration of the id aborts what its previous producer had open.
                    if let Some(old) = state.current.insert(id, pid) {
                        state.end(old, Txn::Aborted);
                        state.held.remove(&old);
                        if old != pid {
                            state.fenced.insert(old);
                        }
                    }
                }
                Ok(frame)
            }
            Pending::Produce(seen) => {
                let header = ResponseHeader::decode(&mut buf, hv)?;
                let r = ProduceResponse::decode(&mut buf, version)?;
                let _ = header;
                let mut state = self.lock();
                for t in &r.responses {
                    for p in &t.partition_responses {
                        if p.error_code != 0 || p.base_offset < 0 {
                            continue;
                        }
                        let name = t.name.0.to_string();
                        let Some((_, _, pid, counts)) = seen.iter().find(|s| s.0 == name && s.1 == p.index) else {
                            continue;
                        };
                        let txn = if state.fenced.contains(pid) { Txn::Aborted } else { Txn::Open };
                        let mut base = p.base_offset;
                        let batches = state.batches.entry((name, p.index)).or_default();
                        for count in counts {
                            batches.insert(base, Batch { pid: *pid, txn });
                            base += count;
                        }
                    }
                }
                Ok(frame)
            }
            Pending::EndTxn { pid, committed } => {
                let header = ResponseHeader::decode(&mut buf, hv)?;
                let r = EndTxnResponse::decode(&mut buf, version)?;
                let _ = header;
                if r.error_code == 0 {
                    let mut state = self.lock();
                    state.end(pid, if committed { Txn::Committed } else { Txn::Aborted });
                    let held = state.held.remove(&pid).unwrap_or_default();
                    if committed {
                        for h in held {
                            for ((topic, partition), offset) in h.offsets {
                                state.committed.insert((h.group.clone(), topic, partition), offset);
                            }
                        }
                    }
                }
                Ok(frame)
            }
            Pending::OffsetCommit(group) => {
                let _ = ResponseHeader::decode(&mut buf, hv)?;
                let r = OffsetCommitResponse::decode(&mut buf, version)?;
                let mut state = self.lock();
                for t in &r.topics {
                    for p in t.partitions.iter().filter(|p| p.error_code == 0) {
                        state.committed.remove(&(group.clone(), t.name.0.to_string(), p.partition_index));
                    }
                }
                Ok(frame)
            }
            Pending::OffsetFetch(group) => {
                let header = ResponseHeader::decode(&mut buf, hv)?;
                let mut r = OffsetFetchResponse::decode(&mut buf, version)?;
                let state = self.lock();
                for t in &mut r.topics {
                    for p in &mut t.partitions {
                        let key = (group.clone(), t.name.0.to_string(), p.partition_index);
                        if let Some((offset, metadata)) = state.committed.get(&key) {
                            p.committed_offset = *offset;
                            p.metadata = metadata.clone().map(StrBytes::from_string);
                            p.error_code = 0;
                        }
                    }
                }
                drop(state);
                encode_response(&header, hv, &r, version)
            }
            Pending::Fetch => {
                let header = ResponseHeader::decode(&mut buf, hv)?;
                let mut r = FetchResponse::decode(&mut buf, version)?;
                let state = self.lock();
                let mut held_back = false;
                for t in &mut r.responses {
                    let name = if t.topic.0.is_empty() {
                        state.names.get(t.topic_id.as_bytes()).cloned().unwrap_or_default()
                    } else {
                        t.topic.0.to_string()
                    };
                    for p in &mut t.partitions {
                        let tp = (name.clone(), p.partition_index);
                        let stable = state.last_stable(&tp).unwrap_or(p.high_watermark).min(p.high_watermark);
                        if p.high_watermark >= 0 {
                            p.last_stable_offset = stable;
                        }
                        let Some(records) = &p.records else { continue };
                        let known = state.batches.get(&tp);
                        let mut out = Vec::with_capacity(records.len());
                        for (at, len) in batches(records) {
                            let base = be_i64(records, at);
                            if base >= stable {
                                held_back = true;
                                break;
                            }
                            let batch = &records[at..at + len];
                            match known.and_then(|k| k.get(&base)) {
                                Some(b) if b.txn == Txn::Aborted => out.extend_from_slice(&emptied(batch)),
                                _ => out.extend_from_slice(batch),
                            }
                        }
                        p.records = Some(Bytes::from(out));
                    }
                }
                drop(state);
                if held_back {
                    // An open transaction holds the reader back: do not let it poll in a tight loop.
                    std::thread::sleep(Duration::from_millis(20));
                }
                encode_response(&header, hv, &r, version)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v2 batch: base offset, `count` records of `record` bytes each, producer id, epoch, attributes.
    fn batch(base: i64, count: i32, record: &[u8], pid: i64, epoch: i16, attributes: i16) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&base.to_be_bytes());
        b.extend_from_slice(&0i32.to_be_bytes()); // length, below
        b.extend_from_slice(&0i32.to_be_bytes()); // partition leader epoch
        b.push(2); // magic
        b.extend_from_slice(&0u32.to_be_bytes()); // crc, below
        b.extend_from_slice(&attributes.to_be_bytes());
        b.extend_from_slice(&(count - 1).to_be_bytes()); // last offset delta
        b.extend_from_slice(&0i64.to_be_bytes()); // first timestamp
        b.extend_from_slice(&0i64.to_be_bytes()); // max timestamp
        b.extend_from_slice(&pid.to_be_bytes());
        b.extend_from_slice(&epoch.to_be_bytes());
        b.extend_from_slice(&0i32.to_be_bytes()); // base sequence
        b.extend_from_slice(&count.to_be_bytes());
        for _ in 0..count {
            b.extend_from_slice(record);
        }
        let len = (b.len() - 12) as i32;
        b[8..12].copy_from_slice(&len.to_be_bytes());
        fix_crc(&mut b);
        b
    }

    #[test]
    fn batches_are_found_and_an_emptied_one_keeps_its_offsets_as_a_control_batch() {
        let mut records = batch(100, 3, b"xyz", 7000, 2, 0x10 | 0x01);
        records.extend(batch(103, 2, b"ab", 7000, 2, 0x10));
        let found = batches(&records);
        assert_eq!(found.len(), 2);
        let (at, len) = found[0];
        assert_eq!((be_i64(&records, at + PID_AT), be_i32(&records, at + LAST_DELTA_AT)), (7000, 2));

        let e = emptied(&records[at..at + len]);
        assert_eq!(e.len(), RECORDS_AT);
        assert_eq!(be_i64(&e, 0), 100, "base offset kept");
        assert_eq!(be_i32(&e, LAST_DELTA_AT), 2, "last offset delta kept: the reader moves past offset 102");
        assert_eq!(be_i32(&e, 8) as usize + 12, RECORDS_AT, "batch length");
        assert_eq!(be_i32(&e, 57), 0, "no records");
        let attributes = i16::from_be_bytes([e[ATTRIBUTES_AT], e[ATTRIBUTES_AT + 1]]);
        assert_eq!(attributes, 0x10 | 0x20, "transactional, control, no compression");
        assert_eq!(u32::from_be_bytes(e[17..21].try_into().unwrap()), crc32c::crc32c(&e[ATTRIBUTES_AT..]));
        assert_eq!(batches(&e), vec![(0, RECORDS_AT)]);
    }

    #[test]
    fn a_truncated_or_foreign_batch_ends_the_list() {
        let records = batch(0, 2, b"abcd", 1, 0, 0);
        assert_eq!(batches(&records[..records.len() - 1]), vec![]);
        let mut v1 = records.clone();
        v1[16] = 1;
        assert_eq!(batches(&v1), vec![]);
    }
}
