//! The questions promote asks the recorded primary (`PrepareSwitchover`).

use super::PRIMARY_TIMEOUT;
use crate::follow::FollowConfig;
use tandem_shared::wire::replication_client::ReplicationClient;
use tandem_shared::wire::{SwitchoverReply, SwitchoverRequest};
use tandem_shared::LogPosition;
use tonic::transport::Channel;

/// What the recorded primary said, or why it could not be asked.
pub(super) enum Answer {
    Reply(SwitchoverReply),
    Unreachable(String),
}

/// The recorded primary, asked over one connection for the whole promote:
/// a catch-up asks again, and a TLS handshake per question is time the
/// applications wait.
pub(super) struct Primary<'a> {
    fc: &'a FollowConfig,
    runtime: Option<tokio::runtime::Runtime>,
    client: Option<ReplicationClient<Channel>>,
}

impl<'a> Primary<'a> {
    pub(super) fn new(fc: &'a FollowConfig) -> Self {
        Self {
            fc,
            runtime: None,
            client: None,
        }
    }

    /// Asks whether a switchover is safe with the standby's durable end at
    /// `durable`. A connection kept from an earlier question that fails is
    /// replaced once before the primary counts as unreachable: a closed
    /// idle connection is not a primary that is gone.
    pub(super) fn ask(&mut self, durable: LogPosition) -> Answer {
        let reused = self.client.is_some();
        match self.ask_once(durable) {
            Answer::Unreachable(_) if reused => {
                self.client = None;
                self.ask_once(durable)
            }
            a => a,
        }
    }

    fn ask_once(&mut self, durable: LogPosition) -> Answer {
        if self.runtime.is_none() {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => self.runtime = Some(r),
                Err(e) => return Answer::Unreachable(format!("cannot start a runtime: {e}")),
            }
        }
        let Some(runtime) = &self.runtime else {
            return Answer::Unreachable("no runtime".into());
        };
        let fc = self.fc;
        let client = &mut self.client;
        runtime.block_on(async {
            if client.is_none() {
                match tandem_shared::client::connect(
                    &fc.primary,
                    fc.server_name.as_deref(),
                    &fc.tls,
                    PRIMARY_TIMEOUT,
                )
                .await
                {
                    Ok(c) => *client = Some(c),
                    Err(e) => return Answer::Unreachable(e.to_string()),
                }
            }
            let Some(c) = client.as_mut() else {
                return Answer::Unreachable("no connection".into());
            };
            let req = SwitchoverRequest {
                standby_name: fc.name.clone(),
                durable: Some(durable.into()),
            };
            match tokio::time::timeout(PRIMARY_TIMEOUT * 6, c.prepare_switchover(req)).await {
                Err(_) => Answer::Unreachable("PrepareSwitchover timed out".into()),
                Ok(Err(s)) if s.code() == tonic::Code::Unavailable => {
                    Answer::Unreachable(s.message().to_owned())
                }
                // A primary that answers but cannot confirm (too old, or it
                // cannot read /proc) is not a primary that is gone.
                Ok(Err(s)) => Answer::Reply(SwitchoverReply {
                    reason: format!(
                        "the primary could not confirm a switchover: {}",
                        s.message()
                    ),
                    env_users: vec![format!("unknown ({})", s.message())],
                    ..Default::default()
                }),
                Ok(Ok(r)) => Answer::Reply(r.into_inner()),
            }
        })
    }
}
