//! A small etcd v3 client: the calls the cluster needs (range, put, delete,
//! leases and their keep-alive, prefix watches), over one member at a time.
//!
//! One connection to one member, not a balanced channel: when the member
//! fails, the caller's session ends and the next `connect` tries the members
//! in turn, starting after the one that failed. That is all the failover a
//! server needs, and it makes "which member are we talking to" a plain fact
//! for logs.

use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tunnel_lib::config::{ClusterSettings, EtcdTls};
use tunnel_lib::etcd::{
    auth_client::AuthClient, kv_client::KvClient, lease_client::LeaseClient, watch_client::WatchClient,
    watch_request::RequestUnion, AuthenticateRequest, DeleteRangeRequest, KeyValue, LeaseGrantRequest,
    LeaseKeepAliveRequest, LeaseRevokeRequest, PutRequest, RangeRequest, WatchCreateRequest, WatchRequest,
    WatchResponse,
};

/// Bound on one unary call: etcd answers in milliseconds when it has quorum.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on connecting to one member.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// HTTP/2 PINGs on the connection, so a member that vanished (its host gone,
/// no RST) is noticed on an idle watch within seconds.
const PING_INTERVAL: Duration = Duration::from_secs(3);
const PING_TIMEOUT: Duration = Duration::from_secs(3);

/// What went wrong talking to etcd.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No member could be reached.
    #[error("no etcd member reachable ({0})")]
    Unreachable(String),
    /// A call failed.
    #[error("etcd {call}: {message}")]
    Call { call: &'static str, message: String },
    /// A call took longer than its bound.
    #[error("etcd {0}: no answer within {CALL_TIMEOUT:?}")]
    Timeout(&'static str),
    /// Reading a TLS file failed.
    #[error("etcd TLS: {0}")]
    Tls(String),
}

fn call_error(call: &'static str, s: tonic::Status) -> EtcdError {
    let message = if s.message().is_empty() { format!("{:?}", s.code()) } else { s.message().to_string() };
    EtcdError::Call { call, message }
}

/// A connection to one etcd member, authenticated when the config says so.
#[derive(Clone)]
pub struct Etcd {
    channel: Channel,
    token: Option<MetadataValue<tonic::metadata::Ascii>>,
    /// The member this connection goes to.
    pub endpoint: http::Uri,
}

/// The end of the range of keys that start with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff: to the end of the keyspace.
    vec![0]
}

async fn timed<T>(
    call: &'static str,
    f: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, EtcdError> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(s)) => Err(call_error(call, s)),
        Err(_) => Err(EtcdError::Timeout(call)),
    }
}

impl Etcd {
    /// Connects to the first member that answers, trying them in order from
    /// `start` (so that after a failure the next one is tried first).
    pub async fn connect(settings: &ClusterSettings, start: usize) -> Result<Self, EtcdError> {
        let n = settings.etcd.len();
        let mut errors = Vec::new();
        for i in 0..n {
            let endpoint = settings.etcd[(start + i) % n].clone();
            match Self::connect_one(settings, &endpoint).await {
                Ok(e) => return Ok(e),
                Err(e) => errors.push(format!("{endpoint}: {e}")),
            }
        }
        Err(EtcdError::Unreachable(errors.join("; ")))
    }

    async fn connect_one(settings: &ClusterSettings, uri: &http::Uri) -> Result<Self, EtcdError> {
        let mut ep = Endpoint::from(uri.clone())
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(PING_INTERVAL)
            .keep_alive_timeout(PING_TIMEOUT)
            .keep_alive_while_idle(true);
        if let Some(tls) = &settings.etcd_tls {
            ep = ep.tls_config(tls_config(tls, uri)?).map_err(|e| EtcdError::Tls(e.to_string()))?;
        }
        let channel = match tokio::time::timeout(CONNECT_TIMEOUT, ep.connect()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(EtcdError::Call { call: "connect", message: error_chain(&e) }),
            Err(_) => return Err(EtcdError::Timeout("connect")),
        };
        let mut etcd = Etcd { channel, token: None, endpoint: uri.clone() };
        if let Some((user, password)) = &settings.etcd_auth {
            let req = AuthenticateRequest { name: user.clone(), password: password.expose().to_string() };
            let resp = timed("authenticate", AuthClient::new(etcd.channel.clone()).authenticate(req)).await?;
            let token = resp.into_inner().token;
            etcd.token = Some(token.parse().map_err(|_| EtcdError::Call {
                call: "authenticate",
                message: "etcd returned a token that is not valid metadata".into(),
            })?);
        }
        Ok(etcd)
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some(t) = &self.token {
            req.metadata_mut().insert("token", t.clone());
        }
        req
    }

    /// Every key under `prefix`, and the store's revision they were read at.
    pub async fn range_prefix(&self, prefix: &[u8]) -> Result<(Vec<KeyValue>, i64), EtcdError> {
        let req = RangeRequest { key: prefix.to_vec(), range_end: prefix_end(prefix), ..Default::default() };
        let resp = timed("range", KvClient::new(self.channel.clone()).range(self.request(req))).await?.into_inner();
        let revision = resp.header.map_or(0, |h| h.revision);
        Ok((resp.kvs, revision))
    }

    /// The value of one key with its mod revision, if it exists.
    pub async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, EtcdError> {
        let req = RangeRequest { key: key.to_vec(), ..Default::default() };
        let resp = timed("range", KvClient::new(self.channel.clone()).range(self.request(req))).await?.into_inner();
        Ok(resp.kvs.into_iter().next())
    }

    /// Writes a key, attached to `lease` (0: none); returns the new revision.
    pub async fn put(&self, key: &[u8], value: Vec<u8>, lease: i64) -> Result<i64, EtcdError> {
        let req = PutRequest { key: key.to_vec(), value, lease };
        let resp = timed("put", KvClient::new(self.channel.clone()).put(self.request(req))).await?.into_inner();
        Ok(resp.header.map_or(0, |h| h.revision))
    }

    /// Deletes a key.
    pub async fn delete(&self, key: &[u8]) -> Result<(), EtcdError> {
        let req = DeleteRangeRequest { key: key.to_vec(), ..Default::default() };
        timed("delete", KvClient::new(self.channel.clone()).delete_range(self.request(req))).await?;
        Ok(())
    }

    /// A new lease of `ttl` whole seconds; its id.
    pub async fn grant(&self, ttl: Duration) -> Result<i64, EtcdError> {
        let req = LeaseGrantRequest { ttl: ttl.as_secs() as i64, id: 0 };
        let resp = timed("lease grant", LeaseClient::new(self.channel.clone()).lease_grant(self.request(req)))
            .await?
            .into_inner();
        if !resp.error.is_empty() {
            return Err(EtcdError::Call { call: "lease grant", message: resp.error });
        }
        Ok(resp.id)
    }

    /// Ends a lease now: every key attached to it is deleted.
    pub async fn revoke(&self, lease: i64) -> Result<(), EtcdError> {
        let req = LeaseRevokeRequest { id: lease };
        timed("lease revoke", LeaseClient::new(self.channel.clone()).lease_revoke(self.request(req))).await?;
        Ok(())
    }

    /// Opens the keep-alive stream of `lease`, renewing it once: the stream,
    /// and the TTL left (0: the lease has expired).
    pub async fn keep_alive(&self, lease: i64) -> Result<(KeepAlive, i64), EtcdError> {
        // One request in flight at a time: a bound of 1 is all it needs. The
        // first goes in before the call: etcd answers the call's headers
        // only with its first response.
        let (tx, rx) = mpsc::channel(1);
        tx.try_send(LeaseKeepAliveRequest { id: lease })
            .map_err(|_| EtcdError::Call { call: "lease keep-alive", message: "request queue".into() })?;
        let resp = timed(
            "lease keep-alive",
            LeaseClient::new(self.channel.clone()).lease_keep_alive(self.request(ReceiverStream::new(rx))),
        )
        .await?;
        let mut ka = KeepAlive { lease, tx, responses: resp.into_inner() };
        let ttl = timed("lease keep-alive", ka.next_ttl()).await?;
        Ok((ka, ttl))
    }

    /// Watches every key under `prefix` from `start_revision` on.
    pub async fn watch_prefix(&self, prefix: &[u8], start_revision: i64) -> Result<Watch, EtcdError> {
        let create = WatchCreateRequest {
            key: prefix.to_vec(),
            range_end: prefix_end(prefix),
            start_revision,
            // Empty responses now and then carry the revision, so a quiet
            // watch still tells how current we are.
            progress_notify: true,
        };
        let first = WatchRequest { request_union: Some(RequestUnion::CreateRequest(create)) };
        let (tx, rx) = mpsc::channel::<WatchRequest>(1);
        tx.try_send(first).map_err(|_| EtcdError::Call { call: "watch", message: "request queue".into() })?;
        let resp =
            timed("watch", WatchClient::new(self.channel.clone()).watch(self.request(ReceiverStream::new(rx)))).await?;
        Ok(Watch { _requests: tx, responses: resp.into_inner() })
    }
}

/// A watch: its responses, and the request side held open (ending it would
/// cancel the watch; nothing more is sent on it).
pub struct Watch {
    _requests: mpsc::Sender<WatchRequest>,
    pub responses: tonic::Streaming<WatchResponse>,
}

/// A lease's keep-alive stream.
pub struct KeepAlive {
    lease: i64,
    tx: mpsc::Sender<LeaseKeepAliveRequest>,
    responses: tonic::Streaming<tunnel_lib::etcd::LeaseKeepAliveResponse>,
}

impl KeepAlive {
    /// Renews the lease; its remaining TTL in seconds (0: it has expired).
    pub async fn renew(&mut self) -> Result<i64, EtcdError> {
        let fut = async {
            self.tx
                .send(LeaseKeepAliveRequest { id: self.lease })
                .await
                .map_err(|_| tonic::Status::unavailable("keep-alive stream closed"))?;
            self.next_ttl().await
        };
        timed("lease keep-alive", fut).await
    }

    async fn next_ttl(&mut self) -> Result<i64, tonic::Status> {
        match self.responses.message().await? {
            Some(r) => Ok(r.ttl),
            None => Err(tonic::Status::unavailable("keep-alive stream ended")),
        }
    }
}

fn tls_config(tls: &EtcdTls, uri: &http::Uri) -> Result<ClientTlsConfig, EtcdError> {
    let read = |p: &std::path::Path| {
        tunnel_lib::units::read_bounded(p, 1 << 20).map_err(|e| EtcdError::Tls(format!("{}: {e}", p.display())))
    };
    let mut c = ClientTlsConfig::new();
    c = match &tls.ca {
        Some(ca) => c.ca_certificate(Certificate::from_pem(read(ca)?)),
        None => c.with_native_roots(),
    };
    if let Some((cert, key)) = &tls.identity {
        c = c.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    if let Some(host) = uri.host() {
        c = c.domain_name(host.trim_start_matches('[').trim_end_matches(']'));
    }
    Ok(c)
}

/// An error and its causes on one line.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let next = c.to_string();
        if !s.contains(&next) {
            s.push_str(": ");
            s.push_str(&next);
        }
        cause = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_is_the_next_key_after_every_key_with_the_prefix() {
        assert_eq!(prefix_end(b"/tunnel/"), b"/tunnel0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
