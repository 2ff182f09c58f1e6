//! gRPC probes as the kubelet runs them: one `grpc.health.v1.Health/Check` call to the
//! pod IP over plaintext HTTP/2 within the probe's timeout, SERVING being the only
//! success, and the kubelet's words for every failure.
//!
//! The two health messages are declared here with prost's derive (the protocol is
//! `grpc/health/v1/health.proto`), so no protoc step is needed; they are public for the
//! tests that serve the protocol.

use std::time::Duration;

use tonic::Code;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Endpoint;

/// The method every gRPC probe calls.
pub const CHECK_PATH: &str = "/grpc.health.v1.Health/Check";

/// The user agent the kubelet's prober sends (tonic appends its own).
const USER_AGENT: &str = "kube-probe/1.33";

/// How long to wait before dialling again after a failed connection within the timeout:
/// the kubelet's prober blocks until the connection is up (`grpc.WithBlock`), so a
/// server that starts listening within the timeout passes.
const REDIAL_AFTER: Duration = Duration::from_millis(100);

/// `grpc.health.v1.HealthCheckRequest`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    pub service: String,
}

/// `grpc.health.v1.HealthCheckResponse`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct HealthCheckResponse {
    #[prost(enumeration = "ServingStatus", tag = "1")]
    pub status: i32,
}

/// `grpc.health.v1.HealthCheckResponse.ServingStatus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ServingStatus {
    Unknown = 0,
    Serving = 1,
    NotServing = 2,
    ServiceUnknown = 3,
}

/// A status as Go's generated `String()` prints it: the proto name, or the number when
/// the server sent one the protocol does not define.
fn status_name(status: i32) -> String {
    match ServingStatus::try_from(status) {
        Ok(ServingStatus::Unknown) => "UNKNOWN".to_string(),
        Ok(ServingStatus::Serving) => "SERVING".to_string(),
        Ok(ServingStatus::NotServing) => "NOT_SERVING".to_string(),
        Ok(ServingStatus::ServiceUnknown) => "SERVICE_UNKNOWN".to_string(),
        Err(_) => status.to_string(),
    }
}

/// A gRPC code as grpc-go names it (`codes.Code.String()`), which spells two of them
/// differently from tonic.
fn code_name(code: Code) -> String {
    match code {
        Code::Ok => "OK".to_string(),
        Code::Cancelled => "Canceled".to_string(),
        other => format!("{other:?}"),
    }
}

/// A whole number of seconds as Go prints a `time.Duration` (`1s`, `1m30s`, `1h0m0s`).
fn go_seconds(duration: Duration) -> String {
    let total = duration.as_secs();
    let (hours, minutes, seconds) = (total / 3600, total % 3600 / 60, total % 60);
    let millis = duration.subsec_millis();
    if total == 0 {
        return if millis == 0 {
            "0s".to_string()
        } else {
            format!("{millis}ms")
        };
    }
    let seconds = if millis == 0 {
        format!("{seconds}s")
    } else {
        format!(
            "{seconds}.{}s",
            format!("{millis:03}").trim_end_matches('0')
        )
    };
    match (hours, minutes) {
        (0, 0) => seconds,
        (0, _) => format!("{minutes}m{seconds}"),
        _ => format!("{hours}h{minutes}m{seconds}"),
    }
}

/// `host:port`, with brackets around an IPv6 address (Go's `net.JoinHostPort`).
fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Asks `host:port` for the health of `service` ("" being the server as a whole).
/// `Ok` when it answers SERVING; otherwise the kubelet's message of the failure.
pub async fn check(host: &str, port: u16, service: &str, timeout: Duration) -> Result<(), String> {
    let address = join_host_port(host, port);
    let deadline = tokio::time::Instant::now() + timeout;
    let timed_out = || {
        format!(
            "timeout: failed to connect service {address:?} within {}: context deadline exceeded",
            go_seconds(timeout)
        )
    };
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .and_then(|endpoint| endpoint.user_agent(USER_AGENT))
        .map_err(|e| format!("error: failed to connect service at {address:?}: {e}"))?;
    let channel = loop {
        match tokio::time::timeout_at(deadline, endpoint.connect()).await {
            Ok(Ok(channel)) => break channel,
            Ok(Err(_)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + REDIAL_AFTER))
                    .await;
            }
            _ => return Err(timed_out()),
        }
    };
    let mut client = tonic::client::Grpc::new(channel);
    let request = tonic::Request::new(HealthCheckRequest {
        service: service.to_string(),
    });
    let call = async {
        client
            .ready()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let codec = tonic_prost::ProstCodec::<HealthCheckRequest, HealthCheckResponse>::default();
        client
            .unary(request, PathAndQuery::from_static(CHECK_PATH), codec)
            .await
    };
    let rpc_timed_out = || {
        format!(
            "timeout: health rpc did not complete within {}",
            go_seconds(timeout)
        )
    };
    match tokio::time::timeout_at(deadline, call).await {
        Err(_) => Err(rpc_timed_out()),
        Ok(Err(status)) => Err(match status.code() {
            Code::Unimplemented => format!(
                "error: this server does not implement the grpc health protocol \
                 (grpc.health.v1.Health): {}",
                status.message()
            ),
            Code::DeadlineExceeded => rpc_timed_out(),
            code => format!(
                "error: health rpc probe failed: rpc error: code = {} desc = {}",
                code_name(code),
                status.message()
            ),
        }),
        Ok(Ok(response)) => {
            let status = response.into_inner().status;
            if status == ServingStatus::Serving as i32 {
                Ok(())
            } else {
                Err(format!(
                    "service unhealthy (responded with {:?})",
                    status_name(status)
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_print_as_the_kubelet_prints_them() {
        assert_eq!(go_seconds(Duration::from_secs(1)), "1s");
        assert_eq!(go_seconds(Duration::from_secs(90)), "1m30s");
        assert_eq!(go_seconds(Duration::from_secs(3600)), "1h0m0s");
        assert_eq!(go_seconds(Duration::from_millis(1500)), "1.5s");
        assert_eq!(go_seconds(Duration::from_millis(100)), "100ms");
        assert_eq!(status_name(2), "NOT_SERVING");
        assert_eq!(status_name(3), "SERVICE_UNKNOWN");
        assert_eq!(status_name(7), "7");
        assert_eq!(code_name(Code::Cancelled), "Canceled");
        assert_eq!(code_name(Code::NotFound), "NotFound");
        assert_eq!(join_host_port("fd00::5", 9000), "[fd00::5]:9000");
    }

    #[test]
    fn health_messages_encode_as_the_protocol_says() {
        use prost::Message as _;
        let request = HealthCheckRequest {
            service: "db".to_string(),
        };
        // Field 1, length-delimited, 2 bytes.
        assert_eq!(request.encode_to_vec(), [0x0a, 2, b'd', b'b']);
        let response = HealthCheckResponse::decode(&[0x08, 2][..]).unwrap();
        assert_eq!(response.status, ServingStatus::NotServing as i32);
    }

    #[tokio::test]
    async fn nothing_listening_is_a_connect_timeout() {
        // A port that was just free: connections to it are refused until the timeout.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let error = check("127.0.0.1", port, "", Duration::from_millis(300))
            .await
            .unwrap_err();
        assert_eq!(
            error,
            format!(
                "timeout: failed to connect service \"127.0.0.1:{port}\" within 300ms: \
                 context deadline exceeded"
            )
        );
    }

    #[tokio::test]
    async fn a_server_that_never_speaks_http2_times_out() {
        // Accepts the connection and says nothing: the HTTP/2 handshake never completes.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let error = check("127.0.0.1", port, "", Duration::from_millis(300))
            .await
            .unwrap_err();
        silent.abort();
        assert!(error.starts_with("timeout: "), "{error}");
    }
}
