//! The daemon's Prometheus metrics: what it counts, who may read them, and `GET /metrics` in the Prometheus text format.
//!
//! Every series is host-wide. No label carries an owner, a VM, a snapshot,
//! a route or anything else a tenant chose: the API is labelled by its route
//! templates (`/vms/{vm_id}`), never by the paths called, so the metrics say
//! how the host is doing and nothing about whose VMs are on it, and their
//! number of series is fixed by the code, not by the traffic.

use crate::domain::VmState;
use crate::manager::{ErrorKind, ManagerError};
use crate::snapshot::Transfer;
use crate::store::{Store, StoreError};
use axum::extract::MatchedPath;
use axum::http::Method;
use prometheus_client::encoding::{
    EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use sha2::{Digest, Sha256};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The `Content-Type` of `GET /metrics`: Prometheus text, version 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Who may scrape: `HATCH_METRICS_TOKEN`, a bearer token of the operator's.
/// Unset, `GET /metrics` does not exist (404).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct MetricsConfig {
    token: Option<String>,
}

// By hand so that logging a `Config` never prints the token.
impl std::fmt::Debug for MetricsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsConfig")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// A shorter token is too easy to guess for something served beside the API.
const MIN_TOKEN_LEN: usize = 16;
const MAX_TOKEN_LEN: usize = 512;

impl MetricsConfig {
    pub fn from_lookup(get: &impl Fn(&str) -> Option<String>) -> Result<MetricsConfig, String> {
        let Some(token) = get("HATCH_METRICS_TOKEN") else {
            return Ok(MetricsConfig::default());
        };
        if !(MIN_TOKEN_LEN..=MAX_TOKEN_LEN).contains(&token.len())
            || !token.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(format!(
                "HATCH_METRICS_TOKEN must be {MIN_TOKEN_LEN} to {MAX_TOKEN_LEN} visible ASCII \
                 characters (no spaces), e.g. the output of `openssl rand -hex 32`"
            ));
        }
        Ok(MetricsConfig { token: Some(token) })
    }

    /// Is `GET /metrics` served at all?
    pub fn enabled(&self) -> bool {
        self.token.is_some()
    }
}

/// What a scraper may do with the token it presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Metrics are off: the path is a 404 like any unknown one.
    Off,
    /// No token, or not the one configured: 401.
    Denied,
    Granted,
}

/// The timed flows of the VM lifecycle; the `operation` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Create or start: from the VM's row to its guest running.
    Boot,
    Stop,
    /// Any snapshot: the Hatch API's, Hypeman's (Standby or Stopped), idle sleep's.
    Snapshot,
    /// A restore through either API (a wake is `Wake`).
    Restore,
    Fork,
    /// A sleeping VM restored for a proxied request.
    Wake,
}

impl Operation {
    pub const ALL: [Operation; 6] = [
        Operation::Boot,
        Operation::Stop,
        Operation::Snapshot,
        Operation::Restore,
        Operation::Fork,
        Operation::Wake,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Boot => "boot",
            Operation::Stop => "stop",
            Operation::Snapshot => "snapshot",
            Operation::Restore => "restore",
            Operation::Fork => "fork",
            Operation::Wake => "wake",
        }
    }
}

fn result_of(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "error"
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// Where a Standby restore's guest memory came from.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MemoryLabels {
    memory: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProxyLabels {
    status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiLabels {
    method: &'static str,
    route: RouteTemplate,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

/// The route a request matched, as the router declares it: holding axum's
/// `MatchedPath` (an `Arc` inside) costs a request no allocation.
#[derive(Clone, Debug)]
struct RouteTemplate(Option<MatchedPath>);

impl RouteTemplate {
    /// What a request no route matched is labelled with (its path is the caller's text).
    const UNMATCHED: &'static str = "unmatched";

    fn as_str(&self) -> &str {
        self.0.as_ref().map_or(Self::UNMATCHED, MatchedPath::as_str)
    }
}

impl PartialEq for RouteTemplate {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for RouteTemplate {}

impl Hash for RouteTemplate {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl EncodeLabelValue for RouteTemplate {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// The `method` label: the methods the API serves by name, any other as `other`
/// (a method is the caller's text too).
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// The object store's byte counters, read at each scrape from the store's
/// own `Transfer` (src/snapshot), which keeps no metrics types of its own.
#[derive(Debug)]
struct TransferBytes(Arc<Transfer>);

impl EncodeMetric for TransferBytes {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (direction, bytes) in [("up", self.0.bytes_up()), ("down", self.0.bytes_down())] {
            encoder
                .encode_family(&DirectionLabels { direction })?
                .encode_counter::<NoLabelSet, _, u64>(&bytes, None)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

/// Lifecycle operations take from a fraction of a second (a stop, a wake
/// from a small snapshot) to minutes (a big memory image over S3).
const OPERATION_BUCKETS: [f64; 13] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0, 600.0,
];
/// A proxied request: a millisecond to a guest's slow answer or a wake.
const PROXY_BUCKETS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

fn operation_histogram() -> Histogram {
    Histogram::new(OPERATION_BUCKETS)
}

fn proxy_histogram() -> Histogram {
    Histogram::new(PROXY_BUCKETS)
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("counting VMs by state: {0}")]
    Store(#[from] StoreError),
    #[error("encoding the metrics: {0}")]
    Encode(#[from] std::fmt::Error),
}

/// Every metric of the daemon. Recording is a hash-map read under a
/// read lock (held for no await) and an atomic add.
pub struct Telemetry {
    registry: Registry,
    /// SHA-256 of the token: compared digest to digest, in constant time.
    token_sha256: Option<[u8; 32]>,
    vms: Family<StateLabels, Gauge>,
    operations: Family<OperationLabels, Histogram, fn() -> Histogram>,
    proxy: Family<ProxyLabels, Histogram, fn() -> Histogram>,
    api: Family<ApiLabels, Counter>,
    sleeps: Family<ResultLabels, Counter>,
    wakes: Family<ResultLabels, Counter>,
    memory_loads: Family<MemoryLabels, Counter>,
    hot_bytes: Gauge,
}

impl Telemetry {
    /// Metrics read by holders of `cfg`'s token, the object store's bytes
    /// coming from `transfer`.
    pub fn new(cfg: &MetricsConfig, transfer: Arc<Transfer>) -> Telemetry {
        let mut registry = Registry::with_prefix("hatch");
        let vms = Family::<StateLabels, Gauge>::default();
        registry.register(
            "vms",
            "VMs in each state, host-wide, read from the store at each scrape",
            vms.clone(),
        );
        let operations = Family::new_with_constructor(operation_histogram as fn() -> Histogram);
        registry.register_with_unit(
            "operation_duration",
            "How long lifecycle operations took (boot, stop, snapshot, restore, fork, wake), \
             by outcome; refusals before an operation started are not counted",
            Unit::Seconds,
            operations.clone(),
        );
        let proxy = Family::new_with_constructor(proxy_histogram as fn() -> Histogram);
        registry.register_with_unit(
            "proxy_request_duration",
            "Proxied requests by the status class of their answer: time until the answer's \
             head (a wake included); _count is the number of requests",
            Unit::Seconds,
            proxy.clone(),
        );
        registry.register_with_unit(
            "object_store",
            "Bytes the snapshot store accepted (up) and handed back (down)",
            Unit::Bytes,
            TransferBytes(transfer),
        );
        let sleeps = Family::<ResultLabels, Counter>::default();
        registry.register(
            "idle_sleeps",
            "VMs put to sleep (a Standby snapshot) for being idle, by outcome",
            sleeps.clone(),
        );
        let wakes = Family::<ResultLabels, Counter>::default();
        registry.register(
            "wakes",
            "Sleeping VMs woken by a proxied request or an SSH connection, by outcome",
            wakes.clone(),
        );
        let memory_loads = Family::<MemoryLabels, Counter>::default();
        registry.register(
            "standby_restores",
            "Standby restores started (wakes included) by where the guest's memory came from: \
             `hot` (kept in host memory since the VM went to sleep) or `store`",
            memory_loads.clone(),
        );
        let hot_bytes = Gauge::default();
        registry.register_with_unit(
            "hot_copy",
            "Guest RAM that sleeping VMs' hot copies hold in host memory",
            Unit::Bytes,
            hot_bytes.clone(),
        );
        let api = Family::<ApiLabels, Counter>::default();
        registry.register(
            "api_requests",
            "API requests by method, route template and status",
            api.clone(),
        );
        // Series that exist from the start, at zero, so a rate or a
        // dashboard works before the first event.
        for op in Operation::ALL {
            for ok in [true, false] {
                let labels = OperationLabels {
                    operation: op.as_str(),
                    result: result_of(ok),
                };
                drop(operations.get_or_create(&labels));
            }
        }
        for ok in [true, false] {
            let labels = ResultLabels {
                result: result_of(ok),
            };
            drop(sleeps.get_or_create(&labels));
            drop(wakes.get_or_create(&labels));
        }
        for memory in ["hot", "store"] {
            drop(memory_loads.get_or_create(&MemoryLabels { memory }));
        }
        for state in VmState::all() {
            drop(vms.get_or_create(&StateLabels {
                state: state.as_str(),
            }));
        }
        Telemetry {
            registry,
            token_sha256: cfg
                .token
                .as_ref()
                .map(|t| Sha256::digest(t.as_bytes()).into()),
            vms,
            operations,
            proxy,
            api,
            sleeps,
            wakes,
            memory_loads,
            hot_bytes,
        }
    }

    /// Is `GET /metrics` served (HATCH_METRICS_TOKEN set)?
    pub fn enabled(&self) -> bool {
        self.token_sha256.is_some()
    }

    /// May the holder of `bearer` (the token of `Authorization: Bearer`) scrape?
    pub fn access(&self, bearer: Option<&str>) -> Access {
        let Some(want) = &self.token_sha256 else {
            return Access::Off;
        };
        let Some(got) = bearer else {
            return Access::Denied;
        };
        let got: [u8; 32] = Sha256::digest(got.as_bytes()).into();
        // No early exit: the time taken says nothing about how much matched.
        let diff = want.iter().zip(got).fold(0u8, |d, (a, b)| d | (a ^ b));
        if diff == 0 {
            Access::Granted
        } else {
            Access::Denied
        }
    }

    /// Every metric in the Prometheus text format, VM states read now.
    pub async fn render(&self, store: &Store) -> Result<String, TelemetryError> {
        let counts = store.vm_count_by_state().await?;
        for state in VmState::all() {
            let n: i64 = counts
                .iter()
                .filter(|(s, _)| s == state)
                .map(|(_, n)| n)
                .sum();
            self.vms
                .get_or_create(&StateLabels {
                    state: state.as_str(),
                })
                .set(n);
        }
        let mut out = String::with_capacity(16 << 10);
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    /// Records one operation that ran for `took`.
    pub fn observe(&self, op: Operation, took: Duration, ok: bool) {
        self.operations
            .get_or_create(&OperationLabels {
                operation: op.as_str(),
                result: result_of(ok),
            })
            .observe(took.as_secs_f64());
    }

    /// Times an operation that ran once its checks passed: record it with
    /// `succeeded`; dropped without (an error returned early, the flow
    /// cancelled), it counts as failed.
    pub fn timer(&self, op: Operation) -> Timer<'_> {
        Timer {
            telemetry: self,
            op,
            started: Instant::now(),
            done: false,
        }
    }

    /// Times a whole manager flow. A refusal (bad request, not found,
    /// conflict, over quota) means the operation never ran: not recorded.
    pub async fn time<T>(
        &self,
        op: Operation,
        flow: impl Future<Output = Result<T, ManagerError>>,
    ) -> Result<T, ManagerError> {
        let started = Instant::now();
        let result = flow.await;
        match &result {
            Ok(_) => self.observe(op, started.elapsed(), true),
            Err(e) if ran(e.kind()) => self.observe(op, started.elapsed(), false),
            Err(_) => {}
        }
        result
    }

    /// An idle VM was put to sleep (or failed to be).
    pub fn slept(&self, ok: bool) {
        self.sleeps
            .get_or_create(&ResultLabels {
                result: result_of(ok),
            })
            .inc();
    }

    /// A sleeping VM was woken for a request (or failed to be) in `took`.
    pub fn woke(&self, took: Duration, ok: bool) {
        self.observe(Operation::Wake, took, ok);
        self.wakes
            .get_or_create(&ResultLabels {
                result: result_of(ok),
            })
            .inc();
    }

    /// A Standby restore starts, its memory from a hot copy or the store.
    pub fn restoring(&self, hot: bool) {
        let memory = if hot { "hot" } else { "store" };
        self.memory_loads
            .get_or_create(&MemoryLabels { memory })
            .inc();
    }

    /// The bytes all hot copies hold now.
    pub fn hot_copies(&self, bytes: u64) {
        self.hot_bytes.set(bytes.min(i64::MAX as u64) as i64);
    }

    /// One proxied request, answered with `status` after `took`.
    pub fn proxied(&self, status: u16, took: Duration) {
        self.proxy
            .get_or_create(&ProxyLabels {
                status_class: status_class(status),
            })
            .observe(took.as_secs_f64());
    }

    /// One API request: its method, the route it matched (None: no route),
    /// the status it got.
    pub fn api_request(&self, method: &Method, route: Option<&MatchedPath>, status: u16) {
        self.api
            .get_or_create(&ApiLabels {
                method: method_label(method),
                route: RouteTemplate(route.cloned()),
                status,
            })
            .inc();
    }
}

/// Did an operation that failed this way run (and so take time worth recording)?
fn ran(kind: ErrorKind) -> bool {
    matches!(kind, ErrorKind::Internal | ErrorKind::Unavailable)
}

/// See `Telemetry::timer`.
#[must_use = "a timer records when it is told the operation succeeded, or when dropped"]
pub struct Timer<'a> {
    telemetry: &'a Telemetry,
    op: Operation,
    started: Instant,
    done: bool,
}

impl Timer<'_> {
    pub fn succeeded(mut self) {
        self.done = true;
        self.telemetry
            .observe(self.op, self.started.elapsed(), true);
    }
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.telemetry
                .observe(self.op, self.started.elapsed(), false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(token: Option<&str>) -> Result<MetricsConfig, String> {
        MetricsConfig::from_lookup(&|k: &str| {
            (k == "HATCH_METRICS_TOKEN")
                .then(|| token.map(str::to_string))
                .flatten()
        })
    }

    fn telemetry(token: Option<&str>) -> Telemetry {
        Telemetry::new(&cfg(token).unwrap(), Arc::new(Transfer::default()))
    }

    #[test]
    fn token_setting() {
        assert!(!cfg(None).unwrap().enabled(), "off unless a token is set");
        assert!(cfg(Some("0123456789abcdef")).unwrap().enabled());
        for bad in ["short", "has a space in it!!", "tab\tinside-a-token"] {
            let e = cfg(Some(bad)).unwrap_err();
            assert!(e.contains("HATCH_METRICS_TOKEN"), "{bad}: {e}");
        }
        assert!(cfg(Some(&"x".repeat(513))).is_err());
        let shown = format!("{:?}", cfg(Some("a-secret-metrics-token")).unwrap());
        assert!(!shown.contains("a-secret"), "{shown}");
    }

    #[test]
    fn only_the_configured_token_gets_in() {
        assert_eq!(telemetry(None).access(Some("anything")), Access::Off);
        let t = telemetry(Some("0123456789abcdef"));
        assert_eq!(t.access(None), Access::Denied);
        assert_eq!(t.access(Some("")), Access::Denied);
        assert_eq!(t.access(Some("0123456789abcdeF")), Access::Denied);
        assert_eq!(t.access(Some("0123456789abcdef0")), Access::Denied);
        assert_eq!(t.access(Some("0123456789abcdef")), Access::Granted);
    }

    #[test]
    fn labels_stay_few() {
        assert_eq!(status_class(204), "2xx");
        assert_eq!(status_class(404), "4xx");
        assert_eq!(status_class(504), "5xx");
        assert_eq!(method_label(&Method::PATCH), "PATCH");
        assert_eq!(method_label(&Method::from_bytes(b"BREW").unwrap()), "other");
        assert_eq!(RouteTemplate(None).as_str(), "unmatched");
    }

    #[test]
    fn a_timer_dropped_without_success_counts_as_failed() {
        let t = telemetry(None);
        t.timer(Operation::Stop).succeeded();
        drop(t.timer(Operation::Stop));
        drop(t.timer(Operation::Stop));
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &t.registry).unwrap();
        for line in [
            r#"hatch_operation_duration_seconds_count{operation="stop",result="ok"} 1"#,
            r#"hatch_operation_duration_seconds_count{operation="stop",result="error"} 2"#,
            r#"hatch_operation_duration_seconds_count{operation="boot",result="ok"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in:\n{text}");
        }
    }
}
