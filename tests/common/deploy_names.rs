//! Metric names: which ones the Grafana dashboard and the Prometheus rules
//! use, which ones `docs/metrics.md` documents, and which ones a live
//! `/metrics` page exposes. Shared by `tests/deploy.rs` (dashboard and rules
//! against the docs) and the worker's tests (a live scrape against the same
//! names). Include it with
//!
//! ```ignore
//! #[path = "common/deploy_names.rs"]
//! mod deploy_names;
//! ```
//!
//! PromQL is read with `promql-parser`: the metric names are those of the
//! selectors in the parsed expression, so an expression that does not parse
//! fails the test that reads it.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use promql_parser::parser::{Expr, VectorSelector};

/// The dashboard, relative to the repository root.
pub const DASHBOARD: &str = "deploy/grafana/dashboards/triagem.json";
/// The alert rules, relative to the repository root.
pub const RULES: &str = "deploy/prometheus/rules/triagem.rules.yml";
/// The metrics contract, relative to the repository root.
pub const METRICS_DOC: &str = "docs/metrics.md";
/// Series that Prometheus itself makes (not the worker): allowed in queries, never scraped.
pub const PROMETHEUS_SERIES: &[&str] = &["up"];
/// Suffixes Prometheus adds to a histogram's name.
pub const HISTOGRAM_SUFFIXES: &[&str] = &["_bucket", "_sum", "_count"];

/// Every metric name in one PromQL expression, from the `promql-parser` AST:
/// the names of its vector and matrix selectors (a bare name or
/// `{__name__="…"}`). Grafana's variables are first replaced by values of the
/// same kind (`$__rate_interval` and other `$__…` by a duration, `$var` by a
/// label value), so a dashboard query parses as Prometheus would see it.
/// Panics with the expression when it is not valid PromQL.
pub fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    if expr.trim().is_empty() {
        return BTreeSet::new(); // a Grafana variable query with no selector, e.g. label_values(job)
    }
    let promql = grafana_variables_substituted(expr);
    let ast = promql_parser::parser::parse(&promql).unwrap_or_else(|e| panic!("invalid PromQL {expr:?}: {e}"));
    let mut names = BTreeSet::new();
    collect_names(&ast, &mut names);
    names
}

fn collect_names(expr: &Expr, names: &mut BTreeSet<String>) {
    match expr {
        Expr::VectorSelector(vs) => selector_name(vs, names),
        Expr::MatrixSelector(ms) => selector_name(&ms.vs, names),
        Expr::Aggregate(a) => {
            collect_names(&a.expr, names);
            if let Some(param) = &a.param {
                collect_names(param, names);
            }
        }
        Expr::Unary(u) => collect_names(&u.expr, names),
        Expr::Binary(b) => {
            collect_names(&b.lhs, names);
            collect_names(&b.rhs, names);
        }
        Expr::Paren(p) => collect_names(&p.expr, names),
        Expr::Subquery(s) => collect_names(&s.expr, names),
        Expr::Call(c) => c.args.args.iter().for_each(|arg| collect_names(arg, names)),
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

fn selector_name(vs: &VectorSelector, names: &mut BTreeSet<String>) {
    let by_matcher = vs.matchers.matchers.iter().find(|m| m.name == "__name__").map(|m| m.value.clone());
    names.extend(vs.name.clone().or(by_matcher));
}

/// `expr` with Grafana's `$__interval`-style variables as `5m` and any other
/// `$name` / `${name}` / `${name:format}` as `x` (they stand inside label
/// matchers' strings, where any value parses).
fn grafana_variables_substituted(expr: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, len) = match after.strip_prefix('{') {
            Some(braced) => {
                let end = braced.find('}').map_or(braced.len(), |e| e + 1);
                (braced[..end.saturating_sub(1)].split(':').next().unwrap_or(""), end + 1)
            }
            None => {
                let end = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
                (&after[..end], end)
            }
        };
        out.push_str(if name.starts_with("__") { "5m" } else { "x" });
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

/// Every PromQL expression of a Grafana dashboard: panel targets (also inside
/// collapsed rows) and the queries of query variables. A variable query
/// `label_values(selector, label)` yields its selector.
pub fn dashboard_exprs(dashboard: &serde_json::Value) -> Vec<String> {
    fn panel_exprs(panels: &serde_json::Value, out: &mut Vec<String>) {
        for panel in panels.as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push(expr.to_string());
                }
            }
            panel_exprs(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    panel_exprs(&dashboard["panels"], &mut out);
    for var in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        if var["type"] != "query" {
            continue;
        }
        let query = var["query"]["query"].as_str().or(var["query"].as_str()).unwrap_or_default();
        out.push(grafana_variable_expr(query));
    }
    out
}

/// The PromQL part of a Grafana Prometheus variable query.
fn grafana_variable_expr(query: &str) -> String {
    let q = query.trim();
    for func in ["label_values(", "query_result("] {
        if let Some(inner) = q.strip_prefix(func).and_then(|r| r.strip_suffix(')')) {
            if func == "label_values(" {
                // label_values(label) or label_values(selector, label): drop the label argument.
                return match inner.rfind(',') {
                    Some(comma) if inner[comma..].find('}').is_none() => inner[..comma].to_string(),
                    _ => String::new(),
                };
            }
            return inner.to_string();
        }
    }
    for func in ["metrics(", "label_names("] {
        if q.starts_with(func) {
            return String::new();
        }
    }
    q.to_string()
}

/// Every `expr` of a Prometheus rule file (alerting and recording rules).
pub fn rule_exprs(rules_yaml: &str) -> Result<Vec<String>, serde_yaml::Error> {
    let doc: serde_yaml::Value = serde_yaml::from_str(rules_yaml)?;
    let mut out = Vec::new();
    for group in doc["groups"].as_sequence().into_iter().flatten() {
        for rule in group["rules"].as_sequence().into_iter().flatten() {
            if let Some(expr) = rule["expr"].as_str() {
                out.push(expr.to_string());
            }
        }
    }
    Ok(out)
}

/// Metric names the dashboard and the alert rules use, each with where it is used.
pub fn referenced_metric_names(repo_root: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut names: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let dashboard_text = std::fs::read_to_string(repo_root.join(DASHBOARD)).expect("read the dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard_text).expect("dashboard is JSON");
    for expr in dashboard_exprs(&dashboard) {
        for name in promql_metric_names(&expr) {
            names.entry(name).or_default().insert(DASHBOARD.to_string());
        }
    }
    let rules_text = std::fs::read_to_string(repo_root.join(RULES)).expect("read the alert rules");
    for expr in rule_exprs(&rules_text).expect("rules are YAML") {
        for name in promql_metric_names(&expr) {
            names.entry(name).or_default().insert(RULES.to_string());
        }
    }
    names
}

/// The metrics table of `docs/metrics.md`: name → type (`counter`, `histogram`, …).
/// A cell may list several names (the process collector's row).
pub fn documented_metrics(markdown: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in markdown.lines() {
        let line = line.trim();
        if !line.starts_with('|') {
            continue;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        if cells.len() < 2 {
            continue;
        }
        let kind = cells[1].to_ascii_lowercase();
        for (n, part) in cells[0].split('`').enumerate() {
            // Odd pieces are inside backticks.
            if n % 2 == 1 && part.starts_with("triagem_") {
                out.insert(part.to_string(), kind.clone());
            }
        }
    }
    out
}

/// The documented metric a queried name belongs to: itself, or the histogram
/// whose `_bucket`/`_sum`/`_count` series it is. `None` when undocumented.
pub fn documented_base<'a>(name: &str, documented: &'a BTreeMap<String, String>) -> Option<&'a str> {
    if let Some((k, _)) = documented.get_key_value(name) {
        return Some(k.as_str());
    }
    for suffix in HISTOGRAM_SUFFIXES {
        if let Some(base) = name.strip_suffix(suffix) {
            if let Some((k, kind)) = documented.get_key_value(base) {
                if kind.contains("histogram") {
                    return Some(k.as_str());
                }
            }
        }
    }
    None
}

/// Metric (sample) names on a Prometheus text-format page such as a worker's
/// `/metrics`: histograms appear as their `_bucket`/`_sum`/`_count` series.
/// A labelled metric that has no child yet has no sample and is absent.
pub fn exposed_metric_names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split(|c: char| c == '{' || c.is_whitespace()).next())
        .map(str::to_string)
        .collect()
}
