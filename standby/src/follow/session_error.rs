//! How a session with the primary ends: refused for good, or to be retried
//! (after a backoff, or at once). The reader, the applier and the
//! connection loop all end sessions; none of them owns this.

/// Why a session ended.
pub(super) enum SessionError {
    Refused(String),
    Retry { why: String, immediately: bool },
}

/// A session to retry after the backoff.
pub(super) fn retry(why: impl ToString) -> SessionError {
    SessionError::Retry {
        why: why.to_string(),
        immediately: false,
    }
}

/// A gRPC status from the primary, as a session outcome.
pub(super) fn classify(status: tonic::Status) -> SessionError {
    // The status message alone can be "transport error"; its causes say why.
    let msg = tandem_shared::client::chain(&status);
    match status.code() {
        tonic::Code::FailedPrecondition => {
            SessionError::Refused(format!("the primary refused this standby: {msg}"))
        }
        tonic::Code::DataLoss => SessionError::Retry {
            why: format!("the primary reported lost log: {msg}"),
            immediately: true,
        },
        _ => retry(format!("{}: {msg}", status.code())),
    }
}
