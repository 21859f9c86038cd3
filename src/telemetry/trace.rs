//! Traces: the W3C `traceparent` a request comes with, the trace id in its log lines and
//! its answer, and the optional OTLP/HTTP export of its span.
//!
//! Two shapes, chosen at start-up by `--otlp-endpoint`:
//!
//! - **no export** (the default): no OpenTelemetry layer is installed, so a request costs
//!   one header parse. The trace id is the caller's, else a fresh random one, and the
//!   server span id is fresh; nothing is recorded, so a fresh trace is marked not sampled.
//! - **export**: the `tracing-opentelemetry` layer turns the request span into an
//!   OpenTelemetry server span (child of the caller's span, when there is one), and a batch
//!   processor on the tokio runtime posts finished spans to the collector. The ids in the
//!   logs and the answer are that span's.
//!
//! Parsing `traceparent` is left to the OpenTelemetry propagator, after a check of its
//! shape: a malformed header reads as "no parent" and the request starts a fresh trace; it
//! is never an error. The answer's headers are written as the propagator writes them (see
//! `RequestTrace::write_headers`).

use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanContext, Status, TraceContextExt, TraceFlags, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::HeaderExtractor;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracer, SdkTracerProvider};
use tracing::Span;
use tracing::field::display;
use tracing_opentelemetry::{OpenTelemetryLayer, OpenTelemetrySpanExt};
use tracing_subscriber::registry::LookupSpan;

static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The answer's header that carries the trace id alone, for people and support tickets.
pub static X_TRACE_ID: HeaderName = HeaderName::from_static("x-trace-id");

/// How long one export may take before it is abandoned (a collector that accepts the
/// connection and never answers). Spans finished meanwhile wait in the processor's
/// bounded queue, and past it they are dropped: a request never waits for the collector.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long shutdown waits for the last spans to reach the collector. Beyond the export
/// time-out, so that one export in flight can finish and the last batch still go.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// The process's traces: the tracer provider when spans are exported, else nothing.
#[derive(Debug, Clone, Default)]
pub struct Traces {
    provider: Option<SdkTracerProvider>,
}

impl Traces {
    /// No export: trace ids are still read, made and answered (see the module doc).
    pub fn off() -> Traces {
        Traces::default()
    }

    /// Exports spans to `traces_url`, the collector's full OTLP/HTTP traces URL (see
    /// `Settings::otlp_traces_url`), as protobuf. Must run inside a tokio runtime: the
    /// batch processor is a task on it.
    pub fn export_to(traces_url: &str) -> Result<Traces, String> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(traces_url)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| format!("--otlp-endpoint: {e}"))?;
        let processor = BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
        let resource = Resource::builder()
            .with_service_name("spray")
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        // The default sampler is parent-based, always on: a caller's "not sampled" is
        // honoured (nothing exported), every other request is exported.
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource)
            .build();
        Ok(Traces {
            provider: Some(provider),
        })
    }

    /// The layer that makes `tracing` spans OpenTelemetry spans, when spans are exported.
    pub fn layer<S>(&self) -> Option<OpenTelemetryLayer<S, SdkTracer>>
    where
        S: tracing::Subscriber + for<'span> LookupSpan<'span>,
    {
        let tracer = self.provider.as_ref()?.tracer("spray");
        Some(tracing_opentelemetry::layer().with_tracer(tracer))
    }

    /// Sends every finished span still queued to the collector, then stops the
    /// exporter, within [`FLUSH_TIMEOUT`]. For the end of the process; a no-op without
    /// export.
    pub async fn shutdown(&self) {
        let Some(provider) = self.provider.clone() else {
            return;
        };
        // The SDK's shutdown blocks its thread until the batch task (on this runtime) has
        // exported: on a thread of its own, it cannot starve that task.
        let flushed = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(FLUSH_TIMEOUT));
        match tokio::time::timeout(FLUSH_TIMEOUT, flushed).await {
            Ok(Ok(Ok(()))) => tracing::debug!("spans flushed to the collector"),
            Ok(Ok(Err(error))) => tracing::warn!(%error, "the last spans may not have reached the collector"),
            Ok(Err(error)) => tracing::warn!(%error, "flushing the spans failed"),
            Err(_) => {
                tracing::warn!(timeout = ?FLUSH_TIMEOUT, "the collector did not take the last spans in time")
            }
        }
    }
}

/// The trace a request belongs to and its own (server) span in it.
#[derive(Debug, Clone)]
pub struct RequestTrace {
    context: SpanContext,
    exported: bool,
}

impl RequestTrace {
    /// Joins `span` (the request span, not yet entered) to the caller's trace from
    /// `headers`, or to a fresh one, and records the trace id on it, so that every line
    /// logged in the span carries it. The span needs empty `trace_id`, `otel.name` and
    /// `otel.kind` fields; `name` names the exported span (made only when exported).
    pub fn start(span: &Span, headers: &HeaderMap, name: impl FnOnce() -> String) -> RequestTrace {
        let parent = extract_parent(headers);
        // Succeeds only when spans are exported and this span is enabled (health checks
        // are not, at the default level).
        let exported = span.set_parent(parent.clone()).is_ok();
        let context = if exported {
            // Read once, before the span is built: the name and kind are fixed then.
            span.record("otel.name", name());
            span.record("otel.kind", "server");
            span.context().span().span_context().clone()
        } else {
            SpanContext::empty_context()
        };
        let context = if context.is_valid() {
            context
        } else {
            unexported_span(parent.span().span_context())
        };
        span.record("trace_id", display(context.trace_id()));
        RequestTrace { context, exported }
    }

    /// Marks an exported span failed (a 5xx): nothing to do without export.
    pub fn answered(&self, span: &Span, status: u16) {
        if self.exported {
            span.set_attribute("http.response.status_code", i64::from(status));
            if status >= 500 {
                span.set_status(Status::error("server error"));
            }
        }
    }

    /// Puts `traceparent` (the server span, so that a client can name it to a collector),
    /// `tracestate` when the caller sent one, and `X-Trace-Id` on the answer.
    ///
    /// The values are those `TraceContextPropagator::inject_context` writes (a unit test
    /// below holds the two equal), made here without it: through the propagator every
    /// answer built an OpenTelemetry `Context`, formatted the ids into three `String`s and
    /// wrote an empty `tracestate` to remove it again, about 3% of a receive's CPU on
    /// SQLite by `perf` (BENCHMARKS.md, 2026-12-07).
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        use std::io::Write as _;
        let context = &self.context;
        // `start` always holds a valid context (the propagator writes nothing for another).
        debug_assert!(context.is_valid());
        // "00-" + 32 + "-" + 16 + "-" + 2 = 55 ASCII characters.
        let mut traceparent = [0u8; 55];
        let written = write!(
            &mut traceparent[..],
            "00-{}-{}-{:02x}",
            context.trace_id(),
            context.span_id(),
            context.trace_flags() & TraceFlags::SAMPLED
        );
        if written.is_err() {
            return; // cannot happen: the ids and flags always fill the 55 bytes exactly
        }
        if let Ok(value) = HeaderValue::from_bytes(&traceparent) {
            headers.insert(TRACEPARENT.clone(), value);
        }
        let state = context.trace_state().header();
        if !state.is_empty()
            && let Ok(value) = HeaderValue::from_str(&state)
        {
            headers.insert(TRACESTATE.clone(), value);
        }
        // The trace id: 32 lowercase hex digits, always a valid header value.
        if let Ok(id) = HeaderValue::from_bytes(&traceparent[3..35]) {
            headers.insert(X_TRACE_ID.clone(), id);
        }
    }
}

/// The caller's span from `traceparent` (and `tracestate`); a missing or malformed one
/// gives a context with no span in it.
fn extract_parent(headers: &HeaderMap) -> Context {
    let well_formed = headers
        .get(&TRACEPARENT)
        .is_some_and(|value| has_traceparent_shape(value.as_bytes()));
    if well_formed {
        TraceContextPropagator::new().extract(&HeaderExtractor(headers))
    } else {
        Context::new()
    }
}

/// `traceparent` is `vv-<32 hex>-<16 hex>-ff`, lowercase, and, from a later version, maybe
/// more after a dash. The propagator checks the values but reads each field as a number,
/// so it would take a field one digit short (or with a `+` in front) as another id: the
/// lengths and digits are checked here first, so that such a header starts a fresh trace.
fn has_traceparent_shape(value: &[u8]) -> bool {
    const FIELDS: [std::ops::Range<usize>; 4] = [0..2, 3..35, 36..52, 53..55];
    let lower_hex = |b: &u8| b.is_ascii_digit() || (b'a'..=b'f').contains(b);
    [2, 35, 52].iter().all(|&dash| value.get(dash) == Some(&b'-'))
        && FIELDS.iter().all(|field| {
            value
                .get(field.clone())
                .is_some_and(|digits| digits.iter().all(lower_hex))
        })
        && matches!(value.get(55), None | Some(b'-'))
}

/// A server span nobody records: the caller's trace (and flags, and trace state) when it
/// sent a valid `traceparent`, else a fresh trace marked not sampled.
fn unexported_span(parent: &SpanContext) -> SpanContext {
    let ids = RandomIdGenerator::default();
    if parent.is_valid() {
        SpanContext::new(
            parent.trace_id(),
            ids.new_span_id(),
            parent.trace_flags(),
            false,
            parent.trace_state().clone(),
        )
    } else {
        SpanContext::new(
            ids.new_trace_id(),
            ids.new_span_id(),
            TraceFlags::default(),
            false,
            Default::default(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(traceparent: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("traceparent", HeaderValue::from_str(traceparent).unwrap());
        headers
    }

    fn parent(headers: &HeaderMap) -> SpanContext {
        extract_parent(headers).span().span_context().clone()
    }

    #[test]
    fn a_valid_traceparent_keeps_its_trace_and_gets_a_new_span() {
        let incoming = headers("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let span = unexported_span(&parent(&incoming));
        assert_eq!(span.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(span.span_id().to_string(), "00f067aa0ba902b7");
        assert!(span.is_sampled());
        let trace = RequestTrace {
            context: span,
            exported: false,
        };
        let mut answer = HeaderMap::new();
        trace.write_headers(&mut answer);
        let echoed = answer["traceparent"].to_str().unwrap();
        assert!(
            echoed.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{echoed}"
        );
        assert!(echoed.ends_with("-01"), "{echoed}");
        assert_eq!(answer[&X_TRACE_ID], "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    /// The headers `write_headers` writes are those the OpenTelemetry propagator would
    /// (less its empty `tracestate`), sampled or not, with a caller's trace state or none.
    #[test]
    fn the_answer_carries_what_the_propagator_would_write() {
        use opentelemetry_http::HeaderInjector;
        for incoming in [
            headers("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            headers("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
            {
                let mut with_state = headers("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
                with_state.insert(
                    "tracestate",
                    HeaderValue::from_static("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"),
                );
                with_state
            },
            HeaderMap::new(),
        ] {
            let trace = RequestTrace {
                context: unexported_span(&parent(&incoming)),
                exported: false,
            };
            let mut ours = HeaderMap::new();
            trace.write_headers(&mut ours);
            let mut theirs = HeaderMap::new();
            let context = Context::new().with_remote_span_context(trace.context.clone());
            TraceContextPropagator::new().inject_context(&context, &mut HeaderInjector(&mut theirs));
            assert_eq!(ours["traceparent"], theirs["traceparent"]);
            let state = &theirs["tracestate"];
            assert_eq!(ours.get("tracestate"), (!state.is_empty()).then_some(state));
            assert_eq!(
                ours[&X_TRACE_ID].to_str().unwrap(),
                trace.context.trace_id().to_string()
            );
        }
    }

    #[test]
    fn malformed_traceparents_start_a_fresh_unsampled_trace() {
        for bad in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-+4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            let parent = parent(&headers(bad));
            assert!(!parent.is_valid(), "{bad:?} was taken");
            let span = unexported_span(&parent);
            assert!(span.is_valid(), "{bad:?}");
            assert!(!span.is_sampled(), "{bad:?}");
            assert_ne!(span.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        }
    }
}
