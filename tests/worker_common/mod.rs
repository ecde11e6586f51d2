//! Shared harness of the worker's integration tests: a Kafka-protocol broker in
//! its own process ([`Broker`]: `triagem-test-broker`, librdkafka's mock cluster
//! served over TCP, by default; `TRIAGEM_TEST_BROKER=tansu` for tansu, in
//! memory or, with `TANSU_STORAGE=sqlite`, on SQLite), its
//! topics, the `triagem worker` binary as a child process,
//! rdkafka producers and readers, and the expected labels computed by loading
//! the same model in-process.
//!
//! The tests are async (rdkafka's futures) on a 2-thread runtime; everything
//! here that blocks — starting a broker, a control command, an HTTP GET, a
//! Kafka request, waiting for a child — is an async function that runs on
//! tokio's blocking pool ([`off_runtime`]), so a test never stalls a runtime
//! thread. The blocking forms (`*_blocking`) are for code that already runs
//! there: the checks polled by [`eventually`].
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::ToBytes;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};

/// Which broker the tests start: `TRIAGEM_TEST_BROKER=test` (the default,
/// `triagem-test-broker`: librdkafka's mock cluster in its own process) or
/// `tansu` (which fails the conformance test: see the README's known issues).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    /// `triagem-test-broker serve`, the faithful broker.
    Test,
    /// `tansu broker` with in-memory storage.
    Tansu,
}

impl BrokerKind {
    /// The kind named by `TRIAGEM_TEST_BROKER` (default `test`).
    pub fn from_env() -> BrokerKind {
        match std::env::var("TRIAGEM_TEST_BROKER").as_deref() {
            Err(_) | Ok("") | Ok("test") => BrokerKind::Test,
            Ok("tansu") => BrokerKind::Tansu,
            Ok(other) => panic!("TRIAGEM_TEST_BROKER={other:?}: expected `test` or `tansu`"),
        }
    }
}

/// Where the tansu binary is looked for, in order: `$TANSU`, `PATH`, `~/.cargo/bin`.
pub fn tansu_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("TANSU") {
        return PathBuf::from(p);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("tansu");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    let candidate = home.join(".cargo/bin/tansu");
    if candidate.is_file() {
        return candidate;
    }
    panic!(
        "TRIAGEM_TEST_BROKER=tansu needs the `tansu` Kafka-protocol broker, which is not installed: \
         run scripts/install-tansu.sh (about 20 minutes on 2 cores), or set TANSU=/path/to/tansu"
    );
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The control channel of a `triagem-test-broker serve --control`: its stdin and stdout.
struct Control {
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// A broker process (see [`BrokerKind`]); killed on drop.
pub struct Broker {
    child: Child,
    /// `127.0.0.1:PORT`: the bootstrap servers.
    pub addr: String,
    /// Which broker this is.
    pub kind: BrokerKind,
    /// Its stderr.
    log: PathBuf,
    /// Commands to the test broker (None for tansu).
    control: Option<Arc<Mutex<Control>>>,
    /// tansu's SQLite file (`TANSU_STORAGE=sqlite`), removed with its journals on drop.
    db: Option<PathBuf>,
}

impl Broker {
    /// Starts the broker `TRIAGEM_TEST_BROKER` names (the test broker by default).
    pub async fn start() -> Broker {
        Broker::start_kind(BrokerKind::from_env()).await
    }

    /// Starts a broker of `kind`.
    pub async fn start_kind(kind: BrokerKind) -> Broker {
        off_runtime(move || Broker::start_blocking(kind)).await
    }

    /// [`Broker::start_kind`] on the calling thread.
    pub fn start_blocking(kind: BrokerKind) -> Broker {
        match kind {
            BrokerKind::Test => Broker::test_broker(1),
            BrokerKind::Tansu => Broker::tansu(),
        }
    }

    /// `triagem-test-broker serve --control` with `brokers` brokers; waits for its address.
    pub fn test_broker(brokers: i32) -> Broker {
        Broker::test_broker_with(&["--brokers", &brokers.to_string()])
    }

    /// `triagem-test-broker serve --control --transactions`: one broker behind
    /// the transaction layer (fencing, offsets in transactions, `read_committed`).
    pub async fn transactional() -> Broker {
        off_runtime(|| Broker::test_broker_with(&["--transactions"])).await
    }

    /// `triagem-test-broker serve --control ARGS`; waits for its address.
    fn test_broker_with(args: &[&str]) -> Broker {
        let log = std::env::temp_dir().join(format!("{}.log", unique("test-broker")));
        let err = std::fs::File::create(&log).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_triagem-test-broker"))
            .args(["serve", "--control"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .expect("run triagem-test-broker");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let Some(addr) = line.trim().strip_prefix("bootstrap.servers=").map(str::to_string) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("triagem-test-broker printed {line:?}:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
        };
        let broker = Broker {
            child,
            addr,
            kind: BrokerKind::Test,
            log,
            control: Some(Arc::new(Mutex::new(Control { stdin, stdout }))),
            db: None,
        };
        let first = broker.addr.split(',').next().unwrap().to_string();
        assert!(
            eventually_blocking(Duration::from_secs(10), || TcpStream::connect(&first).is_ok()),
            "triagem-test-broker does not accept connections on {first}"
        );
        broker
    }

    /// A `tansu broker` on a free port; waits until it accepts connections.
    /// Its storage is in memory (`memory://`), or with `TANSU_STORAGE=sqlite`
    /// an SQLite file of its own in the temporary directory (a tansu built
    /// with `--features libsql`).
    pub fn tansu() -> Broker {
        let bin = tansu_binary();
        for _attempt in 0..3 {
            let port = free_port();
            let url = format!("tcp://127.0.0.1:{port}");
            let log = std::env::temp_dir().join(format!("tansu-{port}-{}.log", std::process::id()));
            let out = std::fs::File::create(&log).unwrap();
            let mut db = None;
            let storage = match std::env::var("TANSU_STORAGE").as_deref() {
                Err(_) | Ok("memory") => "memory://tansu/".to_string(),
                // tansu opens an SQLite URL's path relative to its working directory (set below).
                Ok("sqlite") => {
                    let name = format!("tansu-{port}-{}.db", std::process::id());
                    let path = std::env::temp_dir().join(&name);
                    remove_sqlite(&path);
                    db = Some(path);
                    format!("sqlite://{name}")
                }
                Ok(other) => panic!("TANSU_STORAGE={other:?}: expected `memory` or `sqlite`"),
            };
            let child = Command::new(&bin)
                .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
                .args(["--storage-engine", &storage, "--cluster-id", &format!("triagem-test-{port}")])
                .current_dir(std::env::temp_dir())
                .env("RUST_LOG", "warn")
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}; run scripts/install-tansu.sh", bin.display()));
            let mut broker =
                Broker { child, addr: format!("127.0.0.1:{port}"), kind: BrokerKind::Tansu, log, control: None, db };
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if TcpStream::connect(&broker.addr).is_ok() {
                    return broker;
                }
                if let Ok(Some(_)) = broker.child.try_wait() {
                    break; // port taken meanwhile, or a crash: retry on another port
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            eprintln!("tansu did not start on {}:\n{}", broker.addr, broker.log_text());
            let _ = broker.child.kill();
        }
        panic!("could not start tansu");
    }

    /// The broker's own log.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends one control command to the test broker and returns its answer (`Err` with its error line).
    pub async fn command(&self, line: &str) -> Result<(), String> {
        let control = self.control.clone().unwrap_or_else(|| panic!("{:?} has no control channel", self.kind));
        let (line, log) = (line.to_string(), self.log.clone());
        off_runtime(move || {
            let mut c = control.lock().unwrap();
            writeln!(c.stdin, "{line}").and_then(|_| c.stdin.flush()).expect("write to triagem-test-broker");
            let mut reply = String::new();
            c.stdout.read_line(&mut reply).expect("read from triagem-test-broker");
            match reply.trim() {
                "ok" => Ok(()),
                "" => {
                    Err(format!("triagem-test-broker exited:\n{}", std::fs::read_to_string(&log).unwrap_or_default()))
                }
                other => Err(other.strip_prefix("error: ").unwrap_or(other).to_string()),
            }
        })
        .await
    }

    /// Creates a topic (test broker: a control command; tansu: the admin API).
    pub async fn create_topic(&self, name: &str, partitions: i32) {
        match self.kind {
            BrokerKind::Test => self
                .command(&format!("create {name} {partitions}"))
                .await
                .unwrap_or_else(|e| panic!("create topic {name}: {e}")),
            BrokerKind::Tansu => admin_create_topics(&self.addr, &[(name, partitions)]).await,
        }
    }

    /// Creates the input topic with `input_partitions` and each output topic with one partition.
    pub async fn create_topics(&self, topics: &Topics, input_partitions: i32) {
        self.create_topic(&topics.input, input_partitions).await;
        for t in topics.outputs() {
            self.create_topic(&t, 1).await;
        }
    }

    /// Test broker: drops every connection and refuses new ones until [`Broker::up`].
    pub async fn down(&self) {
        self.command("down all").await.expect("broker down");
    }

    /// Test broker: accepts connections again.
    pub async fn up(&self) {
        self.command("up all").await.expect("broker up");
    }

    /// The broker process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- broker log {} ----\n{}", self.log.display(), self.log_text());
        }
        let _ = std::fs::remove_file(&self.log);
        if let Some(db) = &self.db {
            remove_sqlite(db);
        }
    }
}

/// Removes an SQLite database file and its journals (`-wal`, `-shm`, `-journal`), where present.
fn remove_sqlite(db: &Path) {
    let _ = std::fs::remove_file(db);
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut journal = db.as_os_str().to_owned();
        journal.push(suffix);
        let _ = std::fs::remove_file(journal);
    }
}

/// Creates topics with the admin API (CreateTopics), for brokers that have it.
pub async fn admin_create_topics(brokers: &str, topics: &[(&str, i32)]) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().expect("admin client");
    let new: Vec<NewTopic> = topics.iter().map(|(t, p)| NewTopic::new(t, *p, TopicReplication::Fixed(1))).collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin.create_topics(&new, &opts).await.expect("create topics");
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
    }
}

static UNIQUE: AtomicUsize = AtomicUsize::new(0);

/// A name no other test (or test run) uses.
pub fn unique(prefix: &str) -> String {
    let n = UNIQUE.fetch_add(1, Ordering::SeqCst);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{prefix}-{}-{n}-{nanos:x}", std::process::id())
}

/// The topics of one test.
#[derive(Debug, Clone)]
pub struct Topics {
    pub input: String,
    pub venda: String,
    pub suporte: String,
    pub review: String,
    pub dlq: String,
}

impl Topics {
    pub fn new(test: &str) -> Topics {
        let base = unique(test);
        Topics {
            input: format!("{base}.in"),
            venda: format!("{base}.venda"),
            suporte: format!("{base}.suporte"),
            review: format!("{base}.revisao"),
            dlq: format!("{base}.dlq"),
        }
    }

    pub fn outputs(&self) -> Vec<String> {
        vec![self.venda.clone(), self.suporte.clone(), self.review.clone(), self.dlq.clone()]
    }

    pub fn for_label(&self, label: &str) -> &str {
        match label {
            "venda" => &self.venda,
            "suporte" => &self.suporte,
            other => panic!("unexpected label {other}"),
        }
    }
}

/// The model the tests run: `$TRIAGEM_TEST_MODEL` or the committed `tests/fixtures/tiny-model`.
pub fn tiny_model() -> PathBuf {
    let dir = std::env::var_os("TRIAGEM_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-model"));
    assert!(
        dir.join("model.safetensors").is_file(),
        "test model {} is missing (expected tests/fixtures/tiny-model, or set TRIAGEM_TEST_MODEL to a model \
         directory made with `triagem train --base none --epochs 1 --out DIR`)",
        dir.display()
    );
    dir
}

/// Label and score the worker will assign to each text, computed in-process with the same model.
pub fn expected_predictions(texts: &[&str]) -> Vec<triagem::model::Prediction> {
    let device = triagem::model::ComputeDevice::Cpu.open().unwrap();
    let classifier = triagem::model::Classifier::load(&tiny_model(), &device).unwrap();
    texts.chunks(32).flat_map(|c| classifier.predict(c).unwrap()).collect()
}

/// Customer messages of both kinds, for inputs.
pub const TEXTS: &[&str] = &[
    "quanto custa a geladeira frost free de 375 litros?",
    "meu pedido chegou quebrado, quero trocar",
    "vocês têm air fryer de 5 litros em estoque?",
    "a máquina de lavar parou de centrifugar",
    "qual o preço do sofá retrátil de 3 lugares?",
    "não consigo acessar minha conta no site",
    "tem desconto no pix para o notebook?",
    "o entregador não apareceu e o rastreio não atualiza",
    "quero comprar duas cadeiras de escritório",
    "a tv liga mas fica sem imagem",
    "aceitam cartão em 10x sem juros?",
    "preciso da nota fiscal do meu pedido",
];

/// Keyed JSON chat messages `k-{i}` / `{"text": TEXTS[i % …], "id": i}` for ids `from..from + n`.
pub fn chat_inputs(from: usize, n: usize) -> Vec<(String, Vec<u8>)> {
    (from..from + n)
        .map(|i| {
            (format!("k-{i}"), serde_json::json!({"text": TEXTS[i % TEXTS.len()], "id": i}).to_string().into_bytes())
        })
        .collect()
}

/// `config/default.toml`'s batching, in-flight and commit settings, as
/// environment for [`WorkerProc::start`], where [`write_config`] has small
/// test values: for the tests that run the worker as it runs in production.
pub const PRODUCTION_SETTINGS: [(&str, &str); 4] = [
    ("TRIAGEM__BATCH__MAX_MESSAGES", "32"),
    ("TRIAGEM__BATCH__MAX_WAIT", "20ms"),
    ("TRIAGEM__KAFKA__MAX_IN_FLIGHT", "2000"),
    ("TRIAGEM__KAFKA__COMMIT_INTERVAL", "1s"),
];

/// The `triagem worker` config of a test.
pub fn write_config(dir: &Path, brokers: &str, group: &str, topics: &Topics, extra: &str) -> PathBuf {
    let text = format!(
        r#"[kafka]
brokers = "{brokers}"
group_id = "{group}"
input_topic = "{input}"
commit_interval = "200ms"
max_in_flight = 500

[routing]
review_topic = "{review}"
dead_letter_topic = "{dlq}"

[routing.topics]
venda = "{venda}"
suporte = "{suporte}"

[input]
max_bytes = 2000

[batch]
max_messages = 16
max_wait = "10ms"

[model]
path = "{model}"

[metrics]
listen = "127.0.0.1:0"

[shutdown]
timeout = "20s"
{extra}
"#,
        input = topics.input,
        review = topics.review,
        dlq = topics.dlq,
        venda = topics.venda,
        suporte = topics.suporte,
        model = tiny_model().display(),
    );
    let path = dir.join(format!("{group}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// A `triagem worker` child process, its stderr kept in a file.
pub struct WorkerProc {
    pub child: Child,
    pub log: PathBuf,
}

impl WorkerProc {
    /// Starts `triagem worker --config CONFIG` with extra environment. The
    /// consumer's `session.timeout.ms` is 6 s (librdkafka's default is 45 s),
    /// so that a restart after a SIGKILL does not wait long for the group to
    /// drop the killed member; `env` may override it.
    pub fn start(config: &Path, env: &[(&str, &str)]) -> WorkerProc {
        let log = config.with_extension(format!("{}.log", unique("w")));
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_triagem"));
        cmd.args(["worker", "--config"]).arg(config).env("RUST_LOG", "info").stdout(Stdio::null()).stderr(out);
        cmd.env("TRIAGEM__KAFKA__CONSUMER__SESSION__TIMEOUT__MS", "6000");
        for (k, v) in env {
            cmd.env(k, v);
        }
        WorkerProc { child: cmd.spawn().expect("run triagem worker"), log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM.
    pub async fn terminate(&self) {
        let pid = self.child.id().to_string();
        let status = off_runtime(move || Command::new("kill").args(["-TERM", &pid]).status().unwrap()).await;
        assert!(status.success());
    }

    /// SIGKILL, and reaps it.
    pub async fn kill(&mut self) {
        self.child.kill().unwrap();
        self.wait_exit(Duration::from_secs(10)).await.expect("no exit after SIGKILL");
    }

    /// Waits for exit, up to `limit` (polled without blocking the runtime).
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.child.try_wait().unwrap()
    }

    /// The URL of its metrics endpoint, from its log (polled without blocking the runtime).
    pub async fn metrics_url(&self, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let log = self.log_text();
            if let Some(i) = log.find("metrics on http://") {
                let rest = &log[i + "metrics on ".len()..];
                let end = rest.find(|c: char| c.is_whitespace() || c == '"').unwrap_or(rest.len());
                return rest[..end].to_string();
            }
            assert!(Instant::now() < deadline, "worker never logged its metrics address:\n{log}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- worker log {} ----\n{}", self.log.display(), self.log_text());
        }
    }
}

/// GET over plain HTTP/1.0 (no client crate needed): (status, body).
pub async fn http_get(url: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (host, request) = http_request(url);
    let mut s = tokio::net::TcpStream::connect(&host).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).await.unwrap();
    http_response(&response)
}

/// [`http_get`] on the calling thread.
pub fn http_get_blocking(url: &str) -> (u16, String) {
    let (host, request) = http_request(url);
    let mut s = TcpStream::connect(&host).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    http_response(&response)
}

/// The host and the request of a GET of `url`.
fn http_request(url: &str) -> (String, String) {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let request = format!("GET {} HTTP/1.0\r\nHost: {host}\r\n\r\n", if path.is_empty() { "/" } else { path });
    (host.to_string(), request)
}

/// The status and body of a response.
fn http_response(response: &str) -> (u16, String) {
    let status = response.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// The value of one sample (`name{labels}`) in a Prometheus text page; 0 when absent.
pub fn sample(page: &str, series: &str) -> f64 {
    page.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

pub fn producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        .create()
        .expect("producer")
}

/// Produces one message and waits for its acknowledgement.
pub async fn produce(p: &FutureProducer, topic: &str, key: &str, payload: &[u8], headers: &[(&str, &str)]) {
    let mut h = OwnedHeaders::new();
    for (k, v) in headers {
        h = h.insert(Header { key: k, value: Some(*v) });
    }
    p.send(FutureRecord::to(topic).key(key).payload(payload).headers(h), Timeout::Never)
        .await
        .unwrap_or_else(|(e, _)| panic!("produce to {topic}: {e}"));
}

/// Hands a record to the producer at once and returns its delivery future.
/// (`FutureProducer::send` enqueues only when its future is first polled, so
/// awaiting sends one by one makes one-record batches, each after `linger.ms`.)
pub fn enqueue<K, P>(p: &FutureProducer, mut record: FutureRecord<'_, K, P>) -> DeliveryFuture
where
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
{
    loop {
        match p.send_result(record) {
            Ok(delivery) => return delivery,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err((e, r)) => panic!("produce to {}: {e}", r.topic),
        }
    }
}

/// Produces many messages at once (so that batches hold many of them),
/// waiting for every acknowledgement. Returns the end offset (last offset + 1)
/// written to each partition.
pub async fn produce_all(p: &FutureProducer, topic: &str, messages: &[(String, Vec<u8>)]) -> HashMap<i32, i64> {
    let deliveries: Vec<_> =
        messages.iter().map(|(key, payload)| enqueue(p, FutureRecord::to(topic).key(key).payload(payload))).collect();
    let mut ends = HashMap::new();
    for f in deliveries {
        let d = f.await.expect("producer dropped").unwrap_or_else(|(e, _)| panic!("produce to {topic}: {e}"));
        let end = ends.entry(d.partition).or_insert(0);
        *end = (*end).max(d.offset + 1);
    }
    ends
}

/// One message read from an output topic.
#[derive(Debug, Clone)]
pub struct Out {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub headers: HashMap<String, String>,
    pub header_order: Vec<String>,
    pub payload: Vec<u8>,
}

impl Out {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).unwrap_or(serde_json::Value::Null)
    }
}

/// Reads every output topic from the beginning (no consumer group: assigned
/// partitions) until `done(all so far)` or `limit` passes. Reads with
/// `isolation.level = read_committed` (librdkafka's default, written out: what
/// a downstream consumer of an exactly-once worker must use).
pub async fn read_outputs(
    brokers: &str,
    topics: &[String],
    limit: Duration,
    mut done: impl FnMut(&[Out]) -> bool,
) -> Vec<Out> {
    let reader: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .expect("reader");
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        tpl.add_partition_offset(t, 0, Offset::Beginning).unwrap();
    }
    reader.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    while !done(&out) {
        let now = tokio::time::Instant::now();
        if now >= deadline {
            break;
        }
        // Wake up regularly so that `done` can look at the clock.
        let step = (now + Duration::from_millis(250)).min(deadline);
        let m = match tokio::time::timeout_at(step, reader.recv()).await {
            Err(_) => continue,
            Ok(Err(e)) => {
                eprintln!("reader: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Ok(Ok(m)) => m,
        };
        let mut headers = HashMap::new();
        let mut header_order = Vec::new();
        if let Some(hs) = m.headers() {
            for h in hs.iter() {
                let v = h.value.map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default();
                header_order.push(h.key.to_string());
                headers.insert(h.key.to_string(), v);
            }
        }
        out.push(Out {
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            headers,
            header_order,
            payload: m.payload().unwrap_or_default().to_vec(),
        });
    }
    out
}

/// Outputs per input id (the `id` field of every test input, see [`chat_inputs`]).
pub fn per_id(outs: &[Out]) -> HashMap<u64, usize> {
    let mut m = HashMap::new();
    for o in outs {
        *m.entry(o.json()["id"].as_u64().expect("id")).or_default() += 1;
    }
    m
}

/// The input ids among outputs, taken in as [`read_outputs`] hands over
/// what it has read so far: each output is parsed once, however often the
/// completion check runs (re-counting every output on each check is
/// quadratic, and with tens of thousands of outputs eats the read's time limit).
#[derive(Debug, Default)]
pub struct Ids {
    seen: HashSet<u64>,
    looked: usize,
}

impl Ids {
    /// Takes in the outputs not seen yet (one without an id, such as a
    /// dead-letter stub, counts for none); returns the number of distinct ids.
    pub fn update(&mut self, outs: &[Out]) -> usize {
        self.seen.extend(outs[self.looked..].iter().filter_map(|o| o.json()["id"].as_u64()));
        self.looked = outs.len();
        self.seen.len()
    }

    /// Distinct ids seen.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether `id` has an output.
    pub fn contains(&self, id: u64) -> bool {
        self.seen.contains(&id)
    }
}

/// Reads `topics` from the start until `n` distinct inputs have an output,
/// or `limit` passes: the outputs read, and their ids.
pub async fn read_ids(brokers: &str, topics: &[String], limit: Duration, n: usize) -> (Vec<Out>, Ids) {
    let mut ids = Ids::default();
    let outs = read_outputs(brokers, topics, limit, |o| ids.update(o) >= n).await;
    (outs, ids)
}

/// Offsets committed by `group` on `topic`'s partitions (None where nothing is committed).
pub async fn committed(brokers: &str, group: &str, topic: &str, partitions: i32) -> Vec<Option<i64>> {
    let (b, g, t) = (brokers.to_string(), group.to_string(), topic.to_string());
    off_runtime(move || committed_blocking(&b, &g, &t, partitions)).await
}

/// [`committed`] on the calling thread.
pub fn committed_blocking(brokers: &str, group: &str, topic: &str, partitions: i32) -> Vec<Option<i64>> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = c.committed_offsets(tpl, Duration::from_secs(10)).expect("committed offsets");
    (0..partitions)
        .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        })
        .collect()
}

/// Everything in the output topics: reads until nothing new arrives for `idle`.
/// (tansu's ListOffsets answers the last batch's base offset, so watermarks
/// cannot be used to count.)
pub async fn read_all(brokers: &str, topics: &[String], idle: Duration) -> Vec<Out> {
    let mut last = (0usize, tokio::time::Instant::now());
    read_outputs(brokers, topics, Duration::from_secs(120), move |o| {
        if o.len() != last.0 {
            last = (o.len(), tokio::time::Instant::now());
        }
        last.1.elapsed() >= idle
    })
    .await
}

/// Inputs committed by `group` on `topic`: the committed offsets of its partitions summed (0 where none).
pub async fn committed_total(brokers: &str, group: &str, topic: &str, partitions: i32) -> i64 {
    committed(brokers, group, topic, partitions).await.iter().map(|c| c.unwrap_or(0)).sum()
}

/// [`committed_total`] on the calling thread.
pub fn committed_total_blocking(brokers: &str, group: &str, topic: &str, partitions: i32) -> i64 {
    committed_blocking(brokers, group, topic, partitions).iter().map(|c| c.unwrap_or(0)).sum()
}

/// Sum of `triagem_messages_routed_total` and `triagem_messages_dead_lettered_total` on a worker's metrics page.
pub async fn outputs_acknowledged(metrics_url: &str) -> f64 {
    acknowledged_in(&http_get(metrics_url).await.1)
}

/// [`outputs_acknowledged`] on the calling thread.
pub fn outputs_acknowledged_blocking(metrics_url: &str) -> f64 {
    acknowledged_in(&http_get_blocking(metrics_url).1)
}

fn acknowledged_in(page: &str) -> f64 {
    page.lines()
        .filter(|l| {
            l.starts_with("triagem_messages_routed_total{") || l.starts_with("triagem_messages_dead_lettered_total{")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Runs blocking work on tokio's blocking pool and returns its result; a
/// panic there is the caller's panic.
pub async fn off_runtime<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Polls `f` (which may block: an HTTP GET, a Kafka request) every 200 ms
/// until it returns true or `limit` passes, on tokio's blocking pool, so that
/// an async test never blocks a runtime thread while it waits.
pub async fn eventually(limit: Duration, f: impl FnMut() -> bool + Send + 'static) -> bool {
    tokio::task::spawn_blocking(move || eventually_blocking(limit, f)).await.expect("the polled check panicked")
}

/// [`eventually`] for code that already runs on a blocking thread.
pub fn eventually_blocking(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    f()
}

/// Sum of every series of the metric `name` (e.g. `triagem_offset_gaps_total`) on a metrics page.
pub async fn metric_sum(metrics_url: &str, name: &str) -> f64 {
    sum_in(&http_get(metrics_url).await.1, name)
}

/// [`metric_sum`] on the calling thread.
pub fn metric_sum_blocking(metrics_url: &str, name: &str) -> f64 {
    sum_in(&http_get_blocking(metrics_url).1, name)
}

fn sum_in(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(name) && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' ')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
