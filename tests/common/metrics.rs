//! Reading `/metrics`: the Prometheus text parsed into samples, and the value of a metric
//! with given labels. The recorder is one per process, so a test compares a metric before
//! and after its own requests.
#![allow(dead_code)]

use std::collections::BTreeMap;

use super::{TestApp, plain_get};

/// One sample of the Prometheus text: its name, labels and value.
#[derive(Debug)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (key, value) = pair.split_once('=').unwrap();
                    (key.to_owned(), value.trim_matches('"').to_owned())
                })
                .collect();
            Sample {
                name: name.to_owned(),
                labels,
                value: value.parse().unwrap(),
            }
        })
        .collect()
}

/// The sum of the samples of `name` whose labels include `labels` (0 if none).
pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

/// Every sample `/metrics` shows now.
pub async fn scrape(app: &TestApp) -> Vec<Sample> {
    let answer = app.send(plain_get("/metrics")).await;
    answer.assert_status(200);
    parse(&String::from_utf8(answer.raw).unwrap())
}

/// How far `name` with `labels` moved from the scrape `before` to the scrape `after`.
pub fn delta(before: &[Sample], after: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    value(after, name, labels) - value(before, name, labels)
}

/// The value of `name` with `labels` that `/metrics` shows now (0 if none).
pub async fn counter(app: &TestApp, name: &str, labels: &[(&str, &str)]) -> f64 {
    value(&scrape(app).await, name, labels)
}
