//! `mizzen convert`: legacy Istio traffic config (0.1's `type: route-rule` /
//! `destination-policy` documents and 0.2's `config.istio.io/v1alpha2` `RouteRule` /
//! `DestinationPolicy` objects) into `networking.istio.io/v1` VirtualService +
//! DestinationRule.
//!
//! The mapping follows what the old pilot did with those rules:
//! - every rule for one destination becomes one `http` route of that destination's
//!   VirtualService, ordered by precedence (higher first; ties by rule name, as the 0.x
//!   pilot sorted them), since a VirtualService is first-match like the old rule list;
//! - `tags`/`labels` selecting a version become a named subset in the DestinationRule
//!   (`version: "2"` -> subset `v2`), shared by every rule that names the same labels;
//! - destination policies become the DestinationRule's traffic policies, per subset when
//!   they were per version.
//!
//! Input is read strictly: a field we do not know, or know but cannot express in the v1
//! API, is an error naming file, document and field. Silently dropping part of a routing
//! rule would change where traffic goes.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context as _};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(clap::Args)]
pub struct ConvertArgs {
    /// Legacy config files (multi-document YAML); rules from all of them are merged.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Write one file per destination service into DIR instead of printing to stdout.
    #[arg(short = 'o', long = "output-dir", value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
}

pub fn run(args: ConvertArgs) -> anyhow::Result<u8> {
    let mut inputs = Vec::new();
    for f in &args.files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
        inputs.push((f.display().to_string(), text));
    }
    let out = convert(&inputs)?;
    for w in &out.warnings {
        eprintln!("warning: {w}");
    }
    match args.output_dir {
        None => print!("{}", out.yaml()?),
        Some(dir) => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            for (name, text) in out.files()? {
                let path = dir.join(name);
                std::fs::write(&path, text)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
        }
    }
    Ok(0)
}

// ---------------------------------------------------------------------------------------
// Output model: networking.istio.io/v1, fields in the order Istio's docs write them.

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Doc<S> {
    api_version: &'static str,
    kind: &'static str,
    metadata: Meta,
    spec: S,
}

#[derive(Serialize)]
struct Meta {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<String>,
}

#[derive(Serialize)]
struct VsSpec {
    hosts: Vec<String>,
    http: Vec<HttpRoute>,
}

#[derive(Serialize)]
struct HttpRoute {
    name: String,
    #[serde(rename = "match", skip_serializing_if = "Vec::is_empty")]
    matches: Vec<MatchRequest>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    route: Vec<RouteDestination>,
    #[serde(skip_serializing_if = "Option::is_none")]
    redirect: Option<UriAuthority>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rewrite: Option<UriAuthority>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retries: Option<Retries>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fault: Option<Fault>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mirror: Option<Destination>,
    #[serde(skip_serializing_if = "Option::is_none")]
    headers: Option<Headers>,
}

#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct MatchRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    uri: Option<StringMatch>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scheme: Option<StringMatch>,
    #[serde(skip_serializing_if = "Option::is_none")]
    method: Option<StringMatch>,
    #[serde(skip_serializing_if = "Option::is_none")]
    authority: Option<StringMatch>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    headers: BTreeMap<String, StringMatch>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    source_labels: BTreeMap<String, String>,
}

impl MatchRequest {
    fn is_empty(&self) -> bool {
        self.uri.is_none()
            && self.scheme.is_none()
            && self.method.is_none()
            && self.authority.is_none()
            && self.headers.is_empty()
            && self.source_labels.is_empty()
    }
}

/// One of the three is set. (A struct, not an enum: YAML serializers write enum variants
/// as tags like `!prefix`, which Istio's YAML does not use.)
#[derive(Serialize, Clone, Default)]
struct StringMatch {
    #[serde(skip_serializing_if = "Option::is_none")]
    exact: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    regex: Option<String>,
}

#[derive(Serialize)]
struct RouteDestination {
    destination: Destination,
    #[serde(skip_serializing_if = "Option::is_none")]
    weight: Option<i64>,
}

#[derive(Serialize)]
struct Destination {
    host: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    subset: Option<String>,
}

#[derive(Serialize)]
struct UriAuthority {
    #[serde(skip_serializing_if = "Option::is_none")]
    uri: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    authority: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Retries {
    attempts: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    per_try_timeout: Option<String>,
    retry_on: &'static str,
}

#[derive(Serialize)]
struct Fault {
    #[serde(skip_serializing_if = "Option::is_none")]
    delay: Option<FaultDelay>,
    #[serde(skip_serializing_if = "Option::is_none")]
    abort: Option<FaultAbort>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FaultDelay {
    #[serde(skip_serializing_if = "Option::is_none")]
    fixed_delay: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exponential_delay: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    percentage: Option<Percentage>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FaultAbort {
    #[serde(skip_serializing_if = "Option::is_none")]
    http_status: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    grpc_status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    percentage: Option<Percentage>,
}

#[derive(Serialize)]
struct Percentage {
    value: f64,
}

#[derive(Serialize)]
struct Headers {
    request: HeaderOps,
}

#[derive(Serialize)]
struct HeaderOps {
    add: BTreeMap<String, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DrSpec {
    host: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    traffic_policy: Option<TrafficPolicy>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    subsets: Vec<Subset>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Subset {
    name: String,
    labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    traffic_policy: Option<TrafficPolicy>,
}

#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct TrafficPolicy {
    #[serde(skip_serializing_if = "Option::is_none")]
    load_balancer: Option<LoadBalancer>,
    #[serde(skip_serializing_if = "Option::is_none")]
    connection_pool: Option<ConnectionPool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    outlier_detection: Option<OutlierDetection>,
}

#[derive(Serialize)]
struct LoadBalancer {
    simple: &'static str,
}

#[derive(Serialize, Default)]
struct ConnectionPool {
    #[serde(skip_serializing_if = "Option::is_none")]
    tcp: Option<TcpPool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    http: Option<HttpPool>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TcpPool {
    max_connections: i64,
}

#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct HttpPool {
    #[serde(
        rename = "http1MaxPendingRequests",
        skip_serializing_if = "Option::is_none"
    )]
    http1_max_pending_requests: Option<i64>,
    #[serde(rename = "http2MaxRequests", skip_serializing_if = "Option::is_none")]
    http2_max_requests: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_requests_per_connection: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_retries: Option<i64>,
}

#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct OutlierDetection {
    #[serde(
        rename = "consecutive5xxErrors",
        skip_serializing_if = "Option::is_none"
    )]
    consecutive_5xx_errors: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    interval: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    base_ejection_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_ejection_percent: Option<i64>,
}

// ---------------------------------------------------------------------------------------
// Reading: a JSON object consumed field by field, so leftovers can be named as unknown.

/// Where a value came from, for error messages.
#[derive(Clone)]
struct Loc {
    file: String,
    doc: usize,
}

impl Loc {
    fn err(&self, path: &str, msg: impl std::fmt::Display) -> anyhow::Error {
        if path.is_empty() {
            anyhow!("{}: document {}: {msg}", self.file, self.doc)
        } else {
            anyhow!("{}: document {}: {path}: {msg}", self.file, self.doc)
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

struct Obj {
    map: serde_json::Map<String, Value>,
    path: String,
    loc: Loc,
}

impl Obj {
    fn new(v: Value, path: &str, loc: &Loc) -> anyhow::Result<Obj> {
        match v {
            Value::Object(map) => Ok(Obj {
                map,
                path: path.to_string(),
                loc: loc.clone(),
            }),
            other => Err(loc.err(path, format!("expected a mapping, found {}", kind(&other)))),
        }
    }

    fn at(&self, key: &str) -> String {
        join(&self.path, key)
    }

    fn err(&self, key: &str, msg: impl std::fmt::Display) -> anyhow::Error {
        self.loc.err(&self.at(key), msg)
    }

    /// Take a field; an explicit `null` counts as absent, as in protobuf's YAML mapping.
    fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key).filter(|v| !v.is_null())
    }

    fn obj(&mut self, key: &str) -> anyhow::Result<Option<Obj>> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => Obj::new(v, &self.at(key), &self.loc).map(Some),
        }
    }

    /// A string; YAML scalars that parsed as numbers or booleans are taken as written
    /// (`version: 2` and `version: "2"` meant the same label to the old pilot).
    fn string(&mut self, key: &str) -> anyhow::Result<Option<String>> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => scalar(&v)
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected a string, found {}", kind(&v)))),
        }
    }

    fn int(&mut self, key: &str) -> anyhow::Result<Option<i64>> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => match &v {
                Value::Number(n) if n.as_i64().is_some() => Ok(n.as_i64()),
                Value::String(s) => s
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| self.err(key, format!("expected an integer, found {s:?}"))),
                _ => Err(self.err(key, format!("expected an integer, found {}", kind(&v)))),
            },
        }
    }

    fn float(&mut self, key: &str) -> anyhow::Result<Option<f64>> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => match &v {
                Value::Number(n) => Ok(n.as_f64()),
                Value::String(s) => s
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| self.err(key, format!("expected a number, found {s:?}"))),
                _ => Err(self.err(key, format!("expected a number, found {}", kind(&v)))),
            },
        }
    }

    fn bool(&mut self, key: &str) -> anyhow::Result<Option<bool>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(v) => Err(self.err(key, format!("expected true or false, found {}", kind(&v)))),
        }
    }

    /// A duration as Istio writes them ("2s", "100ms", "1m30s"), checked, kept as written.
    fn duration(&mut self, key: &str) -> anyhow::Result<Option<String>> {
        let Some(s) = self.string(key)? else {
            return Ok(None);
        };
        mizzen_config::duration::parse_duration(&s).map_err(|e| self.err(key, e))?;
        Ok(Some(s.trim().to_string()))
    }

    fn labels(&mut self, key: &str) -> anyhow::Result<BTreeMap<String, String>> {
        let Some(mut o) = self.obj(key)? else {
            return Ok(BTreeMap::new());
        };
        let mut out = BTreeMap::new();
        let keys: Vec<String> = o.map.keys().cloned().collect();
        for k in keys {
            if let Some(v) = o.string(&k)? {
                out.insert(k, v);
            }
        }
        Ok(out)
    }

    fn array(&mut self, key: &str) -> anyhow::Result<Vec<(String, Value)>> {
        match self.take(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => Ok(items
                .into_iter()
                .enumerate()
                .map(|(i, v)| (format!("{}[{i}]", self.at(key)), v))
                .collect()),
            Some(v) => Err(self.err(key, format!("expected a list, found {}", kind(&v)))),
        }
    }

    /// Fail on whatever field nobody took: it is a field we do not convert.
    fn finish(self) -> anyhow::Result<()> {
        match self.map.keys().next() {
            None => Ok(()),
            Some(k) => Err(self.loc.err(&join(&self.path, k), "unknown field")),
        }
    }
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

// ---------------------------------------------------------------------------------------
// The legacy rules, normalised across the 0.1 and 0.2 spellings.

/// A service named by a legacy rule: a host as the v1 API should name it, the namespace it
/// implies (if any), and version labels (0.2 put them inside the destination object).
struct Service {
    host: String,
    namespace: Option<String>,
    labels: BTreeMap<String, String>,
}

struct Rule {
    name: String,
    namespace: Option<String>,
    dest: Service,
    precedence: i64,
    route: HttpRoute,
    /// (host, labels) of every version the route points at, to declare as subsets.
    subsets: Vec<(String, BTreeMap<String, String>)>,
}

struct Policy {
    name: String,
    namespace: Option<String>,
    host: String,
    labels: BTreeMap<String, String>,
    traffic: TrafficPolicy,
    loc: Loc,
}

enum Legacy {
    Rule(Box<Rule>),
    Policies(Vec<Policy>),
}

/// `name.namespace.svc.<domain>` implies the namespace; anything else does not.
fn namespace_of(host: &str) -> Option<String> {
    let parts: Vec<&str> = host.split('.').collect();
    (parts.len() >= 3 && parts[2] == "svc" && !parts[1].is_empty()).then(|| parts[1].to_string())
}

/// A service, as 0.1's FQDN string or 0.2's `IstioService` object.
fn service(v: Value, path: &str, loc: &Loc) -> anyhow::Result<Service> {
    match v {
        Value::String(s) => {
            let host = s.trim().to_string();
            if host.is_empty() {
                return Err(loc.err(path, "empty service name"));
            }
            Ok(Service {
                namespace: namespace_of(&host),
                host,
                labels: BTreeMap::new(),
            })
        }
        other => {
            let mut o = Obj::new(other, path, loc)?;
            let name = o.string("name")?;
            let namespace = o.string("namespace")?;
            let domain = o.string("domain")?;
            let fqdn = o.string("service")?;
            let labels = o.labels("labels")?;
            o.finish()?;
            let host = match (fqdn, name) {
                (Some(f), _) => f,
                (None, Some(n)) => match &namespace {
                    // An explicit namespace must survive: a short host would resolve
                    // relative to the VirtualService's namespace instead.
                    Some(ns) => format!(
                        "{n}.{ns}.svc.{}",
                        domain.as_deref().unwrap_or("cluster.local")
                    ),
                    None => n,
                },
                (None, None) => return Err(loc.err(path, "needs name or service")),
            };
            Ok(Service {
                namespace: namespace.or_else(|| namespace_of(&host)),
                host,
                labels,
            })
        }
    }
}

fn string_match(v: Value, path: &str, loc: &Loc) -> anyhow::Result<StringMatch> {
    let mut o = Obj::new(v, path, loc)?;
    let exact = o.string("exact")?;
    let prefix = o.string("prefix")?;
    let regex = o.string("regex")?;
    o.finish()?;
    let set = [&exact, &prefix, &regex]
        .iter()
        .filter(|x| x.is_some())
        .count();
    if set != 1 {
        return Err(loc.err(path, "needs exactly one of exact, prefix, regex"));
    }
    Ok(StringMatch {
        exact,
        prefix,
        regex,
    })
}

/// The v1alpha1 `match` block: 0.1 spelled it `source`/`sourceTags`/`httpHeaders`, 0.2
/// `source: {name, labels}` and `request.headers`.
fn convert_match(
    mut m: Obj,
    warnings: &mut Vec<String>,
    rule: &str,
) -> anyhow::Result<MatchRequest> {
    let mut out = MatchRequest::default();
    if let Some(src) = m.take("source") {
        let path = m.at("source");
        let s = service(src, &path, &m.loc)?;
        out.source_labels.extend(s.labels);
        // v1 matches callers by workload labels only; a caller *service* has no
        // equivalent without its selector, which this file does not have.
        warnings.push(format!(
            "{}: document {}: rule {rule}: {path}: the caller service {:?} cannot be matched \
             by name in the v1 API; only its labels are kept",
            m.loc.file, m.loc.doc, s.host
        ));
    }
    out.source_labels.extend(m.labels("sourceTags")?);
    let mut headers = Vec::new();
    if let Some(mut h) = m.obj("httpHeaders")? {
        headers.extend(std::mem::take(&mut h.map).into_iter().map(|(k, v)| {
            let p = h.at(&k);
            (k, v, p)
        }));
    }
    if let Some(mut req) = m.obj("request")? {
        if let Some(mut h) = req.obj("headers")? {
            headers.extend(std::mem::take(&mut h.map).into_iter().map(|(k, v)| {
                let p = h.at(&k);
                (k, v, p)
            }));
        }
        req.finish()?;
    }
    for (name, v, path) in headers {
        let sm = string_match(v, &path, &m.loc)?;
        // The old API put the request's pseudo-headers among the headers; v1 has fields.
        match name.as_str() {
            "uri" => out.uri = Some(sm),
            "scheme" => out.scheme = Some(sm),
            "method" => out.method = Some(sm),
            "authority" => out.authority = Some(sm),
            _ => {
                out.headers.insert(name.to_ascii_lowercase(), sm);
            }
        }
    }
    if m.map.contains_key("tcp") || m.map.contains_key("udp") {
        let k = if m.map.contains_key("tcp") {
            "tcp"
        } else {
            "udp"
        };
        return Err(m.err(k, "L4 matches are not supported by mizzen convert"));
    }
    m.finish()?;
    Ok(out)
}

fn percentage(o: &mut Obj) -> anyhow::Result<Option<Percentage>> {
    match o.float("percent")? {
        None => Ok(None),
        Some(p) if (0.0..=100.0).contains(&p) => Ok(Some(Percentage { value: p })),
        Some(p) => Err(o.err("percent", format!("{p} is not between 0 and 100"))),
    }
}

fn convert_fault(mut f: Obj) -> anyhow::Result<Fault> {
    let delay = match f.obj("delay")? {
        None => None,
        Some(mut d) => {
            let percentage = percentage(&mut d)?;
            let fixed_delay = d.duration("fixedDelay")?;
            let exponential_delay = d.duration("exponentialDelay")?;
            if fixed_delay.is_none() && exponential_delay.is_none() {
                return Err(d.err("fixedDelay", "required"));
            }
            d.finish()?;
            Some(FaultDelay {
                fixed_delay,
                exponential_delay,
                percentage,
            })
        }
    };
    let abort = match f.obj("abort")? {
        None => None,
        Some(mut a) => {
            let percentage = percentage(&mut a)?;
            let http_status = a.int("httpStatus")?;
            let grpc_status = a.string("grpcStatus")?;
            if let Some(s) = http_status {
                if !(200..=599).contains(&s) {
                    return Err(a.err("httpStatus", format!("{s} is not an HTTP status")));
                }
            }
            if http_status.is_none() && grpc_status.is_none() {
                return Err(a.err("httpStatus", "required"));
            }
            a.finish()?;
            Some(FaultAbort {
                http_status,
                grpc_status,
                percentage,
            })
        }
    };
    if delay.is_none() && abort.is_none() {
        return Err(f.loc.err(&f.path, "needs delay or abort"));
    }
    f.finish()?;
    Ok(Fault { delay, abort })
}

fn uri_authority(mut o: Obj) -> anyhow::Result<UriAuthority> {
    let uri = o.string("uri")?;
    let authority = o.string("authority")?;
    o.finish()?;
    Ok(UriAuthority { uri, authority })
}

fn route_rule(
    name: String,
    namespace: Option<String>,
    mut spec: Obj,
    warnings: &mut Vec<String>,
) -> anyhow::Result<Rule> {
    let loc = spec.loc.clone();
    let dest_v = spec
        .take("destination")
        .ok_or_else(|| spec.err("destination", "required"))?;
    let dest = service(dest_v, &spec.at("destination"), &loc)?;
    let precedence = spec.int("precedence")?.unwrap_or(0);
    let matches = match spec.obj("match")? {
        None => Vec::new(),
        Some(m) => {
            let m = convert_match(m, warnings, &name)?;
            if m.is_empty() {
                Vec::new()
            } else {
                vec![m]
            }
        }
    };

    let mut subsets = Vec::new();
    let mut route = Vec::new();
    let items = spec.array("route")?;
    let multi = items.len() > 1;
    let mut total = 0i64;
    for (path, item) in items {
        let mut w = Obj::new(item, &path, &loc)?;
        let mut labels = w.labels("tags")?;
        labels.extend(w.labels("labels")?);
        let target = match w.take("destination") {
            None => None,
            Some(v) => Some(service(v, &w.at("destination"), &loc)?),
        };
        let weight = w.int("weight")?;
        w.finish()?;
        let host = match target {
            Some(t) => {
                labels.extend(t.labels);
                t.host
            }
            None => dest.host.clone(),
        };
        match weight {
            Some(n) if !(0..=100).contains(&n) => {
                return Err(loc.err(&join(&path, "weight"), format!("{n} is not 0-100")))
            }
            Some(n) => total += n,
            // One destination takes everything, as the old API said; with several, the
            // split would be a guess.
            None if multi => {
                return Err(loc.err(
                    &join(&path, "weight"),
                    "required when a rule has several routes",
                ))
            }
            None => {}
        }
        let subset = if labels.is_empty() {
            None
        } else {
            subsets.push((host.clone(), labels.clone()));
            Some(labels)
        };
        route.push((host, subset, weight));
    }
    if multi && total != 100 {
        return Err(spec.err("route", format!("weights add up to {total}, not 100")));
    }

    let redirect = spec.obj("redirect")?.map(uri_authority).transpose()?;
    let rewrite = spec.obj("rewrite")?.map(uri_authority).transpose()?;
    if redirect.is_some() && (!route.is_empty() || rewrite.is_some()) {
        return Err(spec.err("redirect", "cannot be combined with route or rewrite"));
    }

    let timeout = match spec.obj("httpReqTimeout")? {
        None => None,
        Some(mut t) => {
            let mut simple = t
                .obj("simpleTimeout")?
                .ok_or_else(|| t.err("simpleTimeout", "required"))?;
            let d = simple.duration("timeout")?;
            if simple.map.contains_key("overrideHeaderName") {
                return Err(simple.err("overrideHeaderName", "not supported by the v1 API"));
            }
            simple.finish()?;
            t.finish()?;
            d
        }
    };
    let retries = match spec.obj("httpReqRetries")? {
        None => None,
        Some(mut r) => {
            let mut simple = r
                .obj("simpleRetry")?
                .ok_or_else(|| r.err("simpleRetry", "required"))?;
            let attempts = simple
                .int("attempts")?
                .ok_or_else(|| simple.err("attempts", "required"))?;
            if attempts < 0 {
                return Err(simple.err("attempts", "must not be negative"));
            }
            let per_try_timeout = simple.duration("perTryTimeout")?;
            if simple.map.contains_key("overrideHeaderName") {
                return Err(simple.err("overrideHeaderName", "not supported by the v1 API"));
            }
            simple.finish()?;
            r.finish()?;
            Some(Retries {
                attempts,
                per_try_timeout,
                // The old pilot retried on these (so a per-try timeout was retried, which
                // the seed's retry demo relies on); v1's default set would not retry it.
                retry_on: "5xx,connect-failure,refused-stream",
            })
        }
    };
    let fault = match spec.obj("httpFault")? {
        None => None,
        Some(f) => Some(convert_fault(f)?),
    };
    let mirror = match spec.take("mirror") {
        None => None,
        Some(v) => {
            let m = service(v, &spec.at("mirror"), &loc)?;
            let subset = if m.labels.is_empty() {
                None
            } else {
                subsets.push((m.host.clone(), m.labels.clone()));
                Some(m.labels)
            };
            Some((m.host, subset))
        }
    };
    let append = spec.labels("appendHeaders")?;
    // v1 proxies upgrade websockets without being asked; `true` needs no translation.
    if spec.bool("websocketUpgrade")? == Some(false) {
        warnings.push(format!(
            "{}: document {}: rule {name}: websocketUpgrade: false has no v1 equivalent; \
             websocket upgrades will be allowed",
            loc.file, loc.doc
        ));
    }
    for unsupported in ["l4Fault", "corsPolicy"] {
        if spec.map.contains_key(unsupported) {
            return Err(spec.err(unsupported, "not supported by mizzen convert"));
        }
    }
    spec.finish()?;

    // A rule that only adds policy (timeout, fault ...) still routed to the destination.
    if route.is_empty() && redirect.is_none() {
        route.push((dest.host.clone(), None, None));
    }
    if route.len() == 1 {
        // A lone destination takes all traffic; `weight: 100` would only be noise.
        if let Some(r) = route.first_mut() {
            r.2 = None;
        }
    }
    let route = route
        .into_iter()
        .map(|(host, labels, weight)| RouteDestination {
            destination: Destination {
                host,
                subset: labels.map(|l| SubsetRef(l).placeholder()),
            },
            weight,
        })
        .collect();
    let mirror = mirror.map(|(host, labels)| Destination {
        host,
        subset: labels.map(|l| SubsetRef(l).placeholder()),
    });
    Ok(Rule {
        name: name.clone(),
        namespace,
        dest,
        precedence,
        subsets,
        route: HttpRoute {
            name,
            matches,
            route,
            redirect,
            rewrite,
            timeout,
            retries,
            fault,
            mirror,
            headers: (!append.is_empty()).then_some(Headers {
                request: HeaderOps { add: append },
            }),
        },
    })
}

/// Subset names are assigned after all rules are read (so that names are unique per
/// host); until then a route carries its labels encoded as a placeholder.
struct SubsetRef(BTreeMap<String, String>);

impl SubsetRef {
    fn placeholder(&self) -> String {
        // serde_json of a BTreeMap is canonical (sorted keys), so equal labels give equal
        // placeholders.
        format!(
            "\u{0}{}",
            serde_json::to_string(&self.0).unwrap_or_default()
        )
    }
}

fn lb_policy(v: Value, path: &str, loc: &Loc) -> anyhow::Result<&'static str> {
    let name = match v {
        Value::String(s) => s,
        other => {
            let mut o = Obj::new(other, path, loc)?;
            let n = o.string("name")?.ok_or_else(|| o.err("name", "required"))?;
            o.finish()?;
            n
        }
    };
    match name.as_str() {
        "ROUND_ROBIN" => Ok("ROUND_ROBIN"),
        // Envoy's "least request" is what 0.x called LEAST_CONN (its own docs said so).
        "LEAST_CONN" => Ok("LEAST_REQUEST"),
        "RANDOM" => Ok("RANDOM"),
        other => Err(loc.err(
            path,
            format!("unknown load balancer {other:?} (ROUND_ROBIN, LEAST_CONN, RANDOM)"),
        )),
    }
}

fn circuit_breaker(mut cb: Obj, tp: &mut TrafficPolicy) -> anyhow::Result<()> {
    let mut simple = cb
        .obj("simpleCb")?
        .ok_or_else(|| cb.err("simpleCb", "required"))?;
    cb.finish()?;
    let max_connections = simple.int("maxConnections")?;
    let mut http = HttpPool {
        http1_max_pending_requests: simple.int("httpMaxPendingRequests")?,
        http2_max_requests: simple.int("httpMaxRequests")?,
        max_requests_per_connection: simple.int("httpMaxRequestsPerConnection")?,
        max_retries: simple.int("httpMaxRetries")?,
    };
    let outlier = OutlierDetection {
        consecutive_5xx_errors: simple.int("httpConsecutiveErrors")?,
        interval: simple.duration("httpDetectionInterval")?,
        base_ejection_time: simple.duration("sleepWindow")?,
        max_ejection_percent: simple.int("httpMaxEjectionPercent")?,
    };
    simple.finish()?;
    let http_set = http.http1_max_pending_requests.is_some()
        || http.http2_max_requests.is_some()
        || http.max_requests_per_connection.is_some()
        || http.max_retries.is_some();
    if max_connections.is_some() || http_set {
        tp.connection_pool = Some(ConnectionPool {
            tcp: max_connections.map(|n| TcpPool { max_connections: n }),
            http: http_set.then(|| std::mem::take(&mut http)),
        });
    }
    let outlier_set = outlier.consecutive_5xx_errors.is_some()
        || outlier.interval.is_some()
        || outlier.base_ejection_time.is_some()
        || outlier.max_ejection_percent.is_some();
    if outlier_set {
        tp.outlier_detection = Some(outlier);
    }
    Ok(())
}

/// One version policy: `tags` (0.1) or the destination's labels (0.2), plus the policies.
fn version_policy(
    o: &mut Obj,
    labels: BTreeMap<String, String>,
) -> anyhow::Result<(BTreeMap<String, String>, TrafficPolicy)> {
    let mut labels = labels;
    labels.extend(o.labels("tags")?);
    let mut tp = TrafficPolicy::default();
    if let Some(v) = o.take("loadBalancing") {
        let path = o.at("loadBalancing");
        tp.load_balancer = Some(LoadBalancer {
            simple: lb_policy(v, &path, &o.loc)?,
        });
    }
    if let Some(cb) = o.obj("circuitBreaker")? {
        circuit_breaker(cb, &mut tp)?;
    }
    Ok((labels, tp))
}

fn destination_policy(
    name: String,
    namespace: Option<String>,
    mut spec: Obj,
) -> anyhow::Result<Vec<Policy>> {
    let loc = spec.loc.clone();
    let dest_v = spec
        .take("destination")
        .ok_or_else(|| spec.err("destination", "required"))?;
    let dest = service(dest_v, &spec.at("destination"), &loc)?;
    if spec.map.contains_key("source") {
        return Err(spec.err(
            "source",
            "caller-specific policies have no DestinationRule equivalent",
        ));
    }
    let mut out = Vec::new();
    let namespace = namespace.or_else(|| dest.namespace.clone());
    // The earliest form listed one policy per version under `policy`.
    for (path, item) in spec.array("policy")? {
        let mut o = Obj::new(item, &path, &loc)?;
        let (labels, traffic) = version_policy(&mut o, dest.labels.clone())?;
        o.finish()?;
        out.push(Policy {
            name: name.clone(),
            namespace: namespace.clone(),
            host: dest.host.clone(),
            labels,
            traffic,
            loc: loc.clone(),
        });
    }
    let (labels, traffic) = version_policy(&mut spec, dest.labels.clone())?;
    spec.finish()?;
    if traffic.load_balancer.is_some()
        || traffic.connection_pool.is_some()
        || traffic.outlier_detection.is_some()
        || out.is_empty()
    {
        out.push(Policy {
            name,
            namespace,
            host: dest.host,
            labels,
            traffic,
            loc,
        });
    }
    Ok(out)
}

/// One YAML document: 0.1's `{type, name, spec}` or 0.2's Kubernetes-style object.
fn document(v: Value, loc: &Loc, warnings: &mut Vec<String>) -> anyhow::Result<Option<Legacy>> {
    if v.is_null() {
        return Ok(None);
    }
    let mut top = Obj::new(v, "", loc)?;
    let (kind, name, namespace) = if let Some(t) = top.string("type")? {
        let name = top
            .string("name")?
            .ok_or_else(|| top.err("name", "required"))?;
        let namespace = top.string("namespace")?;
        (t, name, namespace)
    } else {
        let api = top
            .string("apiVersion")?
            .ok_or_else(|| loc.err("", "neither `type` (Istio 0.1) nor `apiVersion` (0.2)"))?;
        let kind = top
            .string("kind")?
            .ok_or_else(|| top.err("kind", "required"))?;
        if api != "config.istio.io/v1alpha2" && api != "config.istio.io/v1alpha1" {
            return Err(top.err(
                "apiVersion",
                format!("{api}/{kind} is not legacy Istio config (want config.istio.io/v1alpha2)"),
            ));
        }
        let mut meta = top
            .obj("metadata")?
            .ok_or_else(|| top.err("metadata", "required"))?;
        let name = meta
            .string("name")?
            .ok_or_else(|| meta.err("name", "required"))?;
        let namespace = meta.string("namespace")?;
        // The rest of metadata (labels, annotations, server-set fields) does not affect
        // routing and has no single right home in the output.
        (kind, name, namespace)
    };
    let spec = top
        .obj("spec")?
        .ok_or_else(|| top.err("spec", "required"))?;
    top.finish()?;
    match kind.as_str() {
        "route-rule" | "RouteRule" => Ok(Some(Legacy::Rule(Box::new(route_rule(
            name, namespace, spec, warnings,
        )?)))),
        "destination-policy" | "DestinationPolicy" => Ok(Some(Legacy::Policies(
            destination_policy(name, namespace, spec)?,
        ))),
        other => Err(loc.err(
            "",
            format!("{other} is not supported (route-rule and destination-policy are)"),
        )),
    }
}

// ---------------------------------------------------------------------------------------
// Assembly.

/// Everything the inputs say about one destination host.
#[derive(Default)]
struct HostOut {
    namespace: Option<String>,
    rules: Vec<Rule>,
    /// labels -> subset name
    subsets: BTreeMap<BTreeMap<String, String>, String>,
    subset_policies: BTreeMap<BTreeMap<String, String>, TrafficPolicy>,
    policy: Option<TrafficPolicy>,
}

pub struct Converted {
    /// (file stem, documents) per destination, in host order.
    groups: Vec<(String, Vec<String>)>,
    pub warnings: Vec<String>,
}

impl Converted {
    pub fn yaml(&self) -> anyhow::Result<String> {
        let docs: Vec<&String> = self.groups.iter().flat_map(|(_, d)| d).collect();
        Ok(join_docs(docs))
    }

    pub fn files(&self) -> anyhow::Result<Vec<(String, String)>> {
        Ok(self
            .groups
            .iter()
            .map(|(stem, docs)| (format!("{stem}.yaml"), join_docs(docs.iter().collect())))
            .collect())
    }
}

fn join_docs(docs: Vec<&String>) -> String {
    let mut out = String::new();
    for (i, d) in docs.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(d);
    }
    out
}

/// A DNS-1123 label from label values: `version: "2"` -> `v2`, `version: v1` -> `v1`,
/// `{env: prod, version: v1}` -> `prod-v1` (values in key order).
fn subset_name(labels: &BTreeMap<String, String>) -> String {
    let parts: Vec<String> = labels
        .values()
        .map(|v| {
            let v = v.to_ascii_lowercase();
            // A bare number reads as a version number; "v2" is how people say it.
            if v.starts_with(|c: char| c.is_ascii_digit()) {
                format!("v{v}")
            } else {
                v
            }
        })
        .collect();
    let mut name: String = parts
        .join("-")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    while name.contains("--") {
        name = name.replace("--", "-");
    }
    let name = name.trim_matches('-');
    let mut name = if name.is_empty() {
        "subset".to_string()
    } else {
        name.to_string()
    };
    name.truncate(63);
    name.trim_end_matches('-').to_string()
}

/// The name the VirtualService/DestinationRule for a host gets: the service's short name.
fn object_name(host: &str) -> String {
    let short = host.split('.').next().unwrap_or(host);
    let n = subset_name(&BTreeMap::from([(String::new(), short.to_string())]));
    if short.starts_with(|c: char| c.is_ascii_digit()) {
        // subset_name's "v" prefix is for versions, not service names.
        n.trim_start_matches('v').to_string()
    } else {
        n
    }
}

/// Convert `(file name, text)` inputs; all rules are merged per destination host.
pub fn convert(inputs: &[(String, String)]) -> anyhow::Result<Converted> {
    let mut warnings = Vec::new();
    let mut hosts: BTreeMap<String, HostOut> = BTreeMap::new();
    let mut rule_names: HashMap<(String, String), String> = HashMap::new();

    let mut policies = Vec::new();
    for (file, text) in inputs {
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let loc = Loc {
                file: file.clone(),
                doc: i + 1,
            };
            let v = Value::deserialize(doc).map_err(|e| loc.err("", format!("bad YAML: {e}")))?;
            match document(v, &loc, &mut warnings)? {
                None => {}
                Some(Legacy::Rule(rule)) => {
                    let key = (rule.dest.host.clone(), rule.name.clone());
                    let here = format!("{}: document {}", loc.file, loc.doc);
                    if let Some(prev) = rule_names.insert(key, here) {
                        bail!(
                            "{}: document {}: rule {} for {} is also defined at {prev}",
                            loc.file,
                            loc.doc,
                            rule.name,
                            rule.dest.host
                        );
                    }
                    let h = hosts.entry(rule.dest.host.clone()).or_default();
                    if h.namespace.is_none() {
                        h.namespace = rule.namespace.clone().or(rule.dest.namespace.clone());
                    }
                    for (host, labels) in &rule.subsets {
                        hosts
                            .entry(host.clone())
                            .or_default()
                            .subsets
                            .entry(labels.clone())
                            .or_default();
                    }
                    if let Some(h) = hosts.get_mut(&rule.dest.host) {
                        h.rules.push(*rule);
                    }
                }
                Some(Legacy::Policies(ps)) => policies.extend(ps),
            }
        }
    }
    for p in policies {
        let h = hosts.entry(p.host.clone()).or_default();
        if h.namespace.is_none() {
            h.namespace = p.namespace.clone();
        }
        if p.labels.is_empty() {
            if h.policy.is_some() {
                return Err(p.loc.err(
                    "",
                    format!(
                        "policy {}: {} already has a policy for all versions",
                        p.name, p.host
                    ),
                ));
            }
            h.policy = Some(p.traffic);
        } else {
            h.subsets.entry(p.labels.clone()).or_default();
            if h.subset_policies.contains_key(&p.labels) {
                return Err(p.loc.err(
                    "",
                    format!(
                        "policy {}: {} already has a policy for version {:?}",
                        p.name, p.host, p.labels
                    ),
                ));
            }
            h.subset_policies.insert(p.labels, p.traffic);
        }
    }

    let mut groups = Vec::new();
    let mut stems: HashMap<String, usize> = HashMap::new();
    for (host, mut h) in hosts {
        // Name subsets: by label values, made unique within the host.
        let mut taken: HashMap<String, usize> = HashMap::new();
        let mut by_placeholder: HashMap<String, String> = HashMap::new();
        for (labels, name) in h.subsets.iter_mut() {
            let base = subset_name(labels);
            let n = taken.entry(base.clone()).or_insert(0);
            *n += 1;
            *name = if *n == 1 { base } else { format!("{base}-{n}") };
            by_placeholder.insert(SubsetRef(labels.clone()).placeholder(), name.clone());
        }
        let name = object_name(&host);
        let stem = {
            let n = stems.entry(name.clone()).or_insert(0);
            *n += 1;
            if *n == 1 {
                name.clone()
            } else {
                format!("{name}-{n}")
            }
        };
        let meta = || Meta {
            name: name.clone(),
            namespace: h.namespace.clone(),
        };
        let mut docs = Vec::new();
        if !h.rules.is_empty() {
            // Higher precedence first; the 0.x pilot broke ties by name.
            h.rules.sort_by(|a, b| {
                b.precedence
                    .cmp(&a.precedence)
                    .then_with(|| a.name.cmp(&b.name))
            });
            let mut http: Vec<HttpRoute> = h.rules.into_iter().map(|r| r.route).collect();
            for r in &mut http {
                for d in &mut r.route {
                    name_subset(&mut d.destination, &by_placeholder);
                }
                if let Some(m) = r.mirror.as_mut() {
                    name_subset(m, &by_placeholder);
                }
            }
            let vs = Doc {
                api_version: "networking.istio.io/v1",
                kind: "VirtualService",
                metadata: meta(),
                spec: VsSpec {
                    hosts: vec![host.clone()],
                    http,
                },
            };
            docs.push(serde_yaml_ng::to_string(&vs).context("writing YAML")?);
        }
        if !h.subsets.is_empty() || h.policy.is_some() {
            let mut subsets: Vec<Subset> = h
                .subsets
                .iter()
                .map(|(labels, name)| Subset {
                    name: name.clone(),
                    labels: labels.clone(),
                    traffic_policy: h.subset_policies.remove(labels),
                })
                .collect();
            subsets.sort_by(|a, b| a.name.cmp(&b.name));
            let dr = Doc {
                api_version: "networking.istio.io/v1",
                kind: "DestinationRule",
                metadata: meta(),
                spec: DrSpec {
                    host: host.clone(),
                    traffic_policy: h.policy,
                    subsets,
                },
            };
            docs.push(serde_yaml_ng::to_string(&dr).context("writing YAML")?);
        }
        groups.push((stem, docs));
    }
    if groups.is_empty() {
        bail!("no route-rule or destination-policy found in the input");
    }
    Ok(Converted { groups, warnings })
}

/// Swap a destination's subset placeholder for the subset's final name.
fn name_subset(d: &mut Destination, names: &HashMap<String, String>) {
    if let Some(s) = d.subset.as_mut() {
        if let Some(n) = names.get(s.as_str()) {
            *s = n.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subset_names() {
        let l = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        assert_eq!(subset_name(&l(&[("version", "2")])), "v2");
        assert_eq!(subset_name(&l(&[("version", "v1")])), "v1");
        assert_eq!(
            subset_name(&l(&[("env", "prod"), ("version", "1.2")])),
            "prod-v1-2"
        );
        assert_eq!(subset_name(&l(&[("version", "__")])), "subset");
    }

    #[test]
    fn namespaces() {
        assert_eq!(
            namespace_of("helloworldsvc.default.svc.cluster.local").as_deref(),
            Some("default")
        );
        assert_eq!(namespace_of("reviews"), None);
    }
}
