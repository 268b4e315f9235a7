//! The connection handshake both nodes run: introductions, then HMAC
//! challenge-response in both directions.

use crate::auth::{auth_mac, auth_verify, new_nonce};
use crate::stream::{write_message, FrameReader};
use crate::{Message, WireError, PROTOCOL_VERSION};
use std::borrow::Cow;
use tokio::io::{AsyncRead, AsyncWrite};

/// What the handshake checks the peer against.
#[derive(Clone, Copy, Debug)]
pub struct HandshakeConfig<'a> {
    /// The resource this connection serves.
    pub resource: &'a str,
    /// This node's name.
    pub me: &'a str,
    /// The name the peer must introduce itself with.
    pub peer: &'a str,
    /// The resource's `shared-secret`.
    pub secret: &'a [u8],
}

/// Why a handshake failed. Every message reads as a complete log line.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The connection broke or carried a malformed frame.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The peer speaks another protocol version.
    #[error("peer speaks wire protocol version {theirs}, this node speaks version {ours}: run the same tandem version on both nodes")]
    VersionMismatch {
        /// [`PROTOCOL_VERSION`].
        ours: u16,
        /// The peer's version.
        theirs: u16,
    },
    /// The peer's connection is for another resource.
    #[error(
        "peer is configured for resource {got:?}, this connection is for resource {expected:?}"
    )]
    WrongResource {
        /// Our resource name.
        expected: String,
        /// The peer's.
        got: String,
    },
    /// The peer is not the node this resource replicates to.
    #[error("peer introduced itself as node {got:?}, but this resource's peer is {expected:?}")]
    WrongNode {
        /// The configured peer name.
        expected: String,
        /// The name the peer gave.
        got: String,
    },
    /// The peer claims this node's own name: the configuration names the
    /// same node twice, or the connection loops back to this node. Refused
    /// because authentication relies on the two names differing.
    #[error("peer claims this node's own name {name:?}: a node cannot be its own peer (check the resource's node names and addresses)")]
    SameName {
        /// The name both ends claim.
        name: String,
    },
    /// We verified their response and it was wrong.
    #[error("peer {peer} failed authentication: its shared-secret differs from ours")]
    PeerFailedAuth {
        /// The peer's name.
        peer: String,
    },
    /// They refused our response.
    #[error("peer {peer} refused our authentication: {reason}")]
    RefusedByPeer {
        /// The peer's name.
        peer: String,
        /// The reason it sent, made printable.
        reason: String,
    },
    /// The peer sent a different message than the handshake calls for.
    #[error("protocol error during the handshake: expected {expected}, got {got}")]
    Unexpected {
        /// The message type the handshake was waiting for.
        expected: &'static str,
        /// The message type that arrived.
        got: &'static str,
    },
    /// The peer ended the handshake with `Disconnect`, e.g. because it
    /// found a mismatch on its side.
    #[error("peer {peer} ended the handshake: {reason}")]
    PeerDisconnected {
        /// The peer's name.
        peer: String,
        /// The reason it sent, made printable.
        reason: String,
    },
    /// The peer closed the connection during the handshake.
    #[error("peer closed the connection during the handshake")]
    Closed,
    /// The connection was closed or reset before any frame came back: no
    /// tandem answered on it (a proxy or load balancer in front of a peer
    /// that is not listening yet behaves this way). Like a refused connect,
    /// this is routine while the peer is down.
    #[error("the connection was closed before the peer said hello")]
    Unanswered,
}

impl HandshakeError {
    /// Whether this only says that no peer answered (see
    /// [`HandshakeError::Unanswered`]), as opposed to a peer that answered
    /// and was refused or misbehaved.
    pub fn is_unanswered(&self) -> bool {
        matches!(self, HandshakeError::Unanswered)
    }
}

/// `s` with control characters escaped, for putting text that came from
/// the network into a log line without letting it forge new lines or
/// terminal escapes.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    Cow::Owned(
        s.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

/// The reason sent in `AuthFailed`; the peer shows it in its
/// `RefusedByPeer` error.
const AUTH_FAILED_REASON: &str = "HMAC response did not verify: the shared-secret differs";

/// Symmetric handshake run by both sides on a fresh connection: send Hello, read Hello (check version, resource,
/// node == cfg.peer); send AuthChallenge(nonce), read theirs; send AuthResponse(mac over THEIR nonce with me as responder);
/// read their AuthResponse and verify it against OUR nonce with the peer as responder; send AuthOk or AuthFailed{reason}
/// (then return PeerFailedAuth); read their AuthOk / AuthFailed (-> RefusedByPeer).
///
/// Each side sends before it reads at every step, so neither waits for the
/// other and the exchange takes three round trips. On success the stream
/// is positioned after the handshake, ready for `ReportState`.
///
/// Because the check is symmetric, two nodes with different secrets both
/// fail their peer: each returns [`HandshakeError::PeerFailedAuth`].
/// [`HandshakeError::RefusedByPeer`] comes back when the peer refused us
/// while we accepted it. When this side finds a mismatch before the
/// authentication verdict, it sends `Disconnect` with the reason (best
/// effort) so the peer can log why, then returns the error.
///
/// No timeout here: the caller wraps the call in one.
pub async fn handshake<R, W>(
    r: &mut FrameReader<R>,
    w: &mut W,
    cfg: &HandshakeConfig<'_>,
) -> Result<(), HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let sent = write_message(
        w,
        &Message::Hello {
            version: PROTOCOL_VERSION,
            resource: cfg.resource.to_owned(),
            node: cfg.me.to_owned(),
        },
    )
    .await;
    // Read even when our hello could not go out: whether the peer said
    // anything before hanging up tells a refused-like "nobody there" from
    // a peer that answered and left.
    let first = match (recv(r, cfg).await, sent) {
        (Ok(m), Ok(())) => m,
        (Ok(_), Err(e)) => return Err(e.into()),
        (Err(e), _) if closed_silently(&e) => return Err(HandshakeError::Unanswered),
        (Err(e), _) => return Err(e),
    };
    let (version, resource, node) = match first {
        Message::Hello {
            version,
            resource,
            node,
        } => (version, resource, node),
        other => return Err(unexpected(w, "Hello", &other).await),
    };
    if version != PROTOCOL_VERSION {
        let reason = format!(
            "{} speaks wire protocol version {PROTOCOL_VERSION}, not {version}",
            cfg.me
        );
        return Err(refuse(
            w,
            reason,
            HandshakeError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: version,
            },
        )
        .await);
    }
    if resource != cfg.resource {
        let reason = format!(
            "{} serves resource {:?} on this connection, not {:?}",
            cfg.me,
            cfg.resource,
            printable(&resource)
        );
        let err = HandshakeError::WrongResource {
            expected: cfg.resource.to_owned(),
            got: resource,
        };
        return Err(refuse(w, reason, err).await);
    }
    // Authentication binds each response to the responder's name; with one
    // name on both ends a challenge could be reflected back and answered.
    if node == cfg.me || cfg.me == cfg.peer {
        let reason = format!("{} will not replicate to a node of its own name", cfg.me);
        return Err(refuse(
            w,
            reason,
            HandshakeError::SameName {
                name: cfg.me.to_owned(),
            },
        )
        .await);
    }
    if node != cfg.peer {
        let reason = format!(
            "{} expects its peer to be {:?}, not {:?}",
            cfg.me,
            cfg.peer,
            printable(&node)
        );
        let err = HandshakeError::WrongNode {
            expected: cfg.peer.to_owned(),
            got: node,
        };
        return Err(refuse(w, reason, err).await);
    }

    let ours = new_nonce().map_err(WireError::Io)?;
    write_message(w, &Message::AuthChallenge { nonce: ours }).await?;
    let theirs = match recv(r, cfg).await? {
        Message::AuthChallenge { nonce } => nonce,
        other => return Err(unexpected(w, "AuthChallenge", &other).await),
    };
    let mac = auth_mac(cfg.secret, cfg.resource, cfg.me, &theirs);
    write_message(w, &Message::AuthResponse { mac }).await?;
    let their_mac = match recv(r, cfg).await? {
        Message::AuthResponse { mac } => mac,
        other => return Err(unexpected(w, "AuthResponse", &other).await),
    };
    if !auth_verify(cfg.secret, cfg.resource, cfg.peer, &ours, &their_mac) {
        // Best effort: the peer learns why we hang up, but our error stands
        // whether or not the message gets through.
        let _ = write_message(
            w,
            &Message::AuthFailed {
                reason: AUTH_FAILED_REASON.to_owned(),
            },
        )
        .await;
        return Err(HandshakeError::PeerFailedAuth {
            peer: cfg.peer.to_owned(),
        });
    }
    write_message(w, &Message::AuthOk).await?;
    match recv(r, cfg).await? {
        Message::AuthOk => Ok(()),
        Message::AuthFailed { reason } => Err(HandshakeError::RefusedByPeer {
            peer: cfg.peer.to_owned(),
            reason: printable(&reason).into_owned(),
        }),
        other => Err(unexpected(w, "AuthOk", &other).await),
    }
}

/// The next message, with end of stream and the peer's `Disconnect`
/// turned into their handshake errors.
async fn recv<R: AsyncRead + Unpin>(
    r: &mut FrameReader<R>,
    cfg: &HandshakeConfig<'_>,
) -> Result<Message, HandshakeError> {
    match r.next().await? {
        None => Err(HandshakeError::Closed),
        Some(Message::Disconnect { reason }) => Err(HandshakeError::PeerDisconnected {
            peer: cfg.peer.to_owned(),
            reason: printable(&reason).into_owned(),
        }),
        Some(msg) => Ok(msg),
    }
}

/// The connection ended (closed or reset) without a frame from the peer.
fn closed_silently(e: &HandshakeError) -> bool {
    match e {
        HandshakeError::Closed => true,
        HandshakeError::Wire(WireError::Io(e)) => matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::UnexpectedEof
        ),
        _ => false,
    }
}

/// Tell the peer why we are hanging up (best effort: a write error would
/// only hide the real problem) and hand back `err`.
async fn refuse<W: AsyncWrite + Unpin>(
    w: &mut W,
    reason: String,
    err: HandshakeError,
) -> HandshakeError {
    let _ = write_message(w, &Message::Disconnect { reason }).await;
    err
}

async fn unexpected<W: AsyncWrite + Unpin>(
    w: &mut W,
    expected: &'static str,
    got: &Message,
) -> HandshakeError {
    let reason = format!(
        "protocol error during the handshake: expected {expected}, got {}",
        got.name()
    );
    refuse(
        w,
        reason,
        HandshakeError::Unexpected {
            expected,
            got: got.name(),
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{split, DuplexStream, ReadHalf, WriteHalf};

    type Reader = FrameReader<ReadHalf<DuplexStream>>;
    type Writer = WriteHalf<DuplexStream>;

    fn pair() -> ((Reader, Writer), (Reader, Writer)) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (ar, aw) = split(a);
        let (br, bw) = split(b);
        ((FrameReader::new(ar), aw), (FrameReader::new(br), bw))
    }

    fn cfg<'a>(
        resource: &'a str,
        me: &'a str,
        peer: &'a str,
        secret: &'a [u8],
    ) -> HandshakeConfig<'a> {
        HandshakeConfig {
            resource,
            me,
            peer,
            secret,
        }
    }

    /// Run both sides concurrently and return both results.
    async fn both(
        a: HandshakeConfig<'_>,
        b: HandshakeConfig<'_>,
    ) -> (
        Result<(), HandshakeError>,
        Result<(), HandshakeError>,
        (Reader, Writer),
        (Reader, Writer),
    ) {
        let ((mut ar, mut aw), (mut br, mut bw)) = pair();
        let (ra, rb) = tokio::join!(
            handshake(&mut ar, &mut aw, &a),
            handshake(&mut br, &mut bw, &b)
        );
        (ra, rb, (ar, aw), (br, bw))
    }

    #[tokio::test]
    async fn same_secret_both_succeed_and_the_stream_stays_in_step() {
        let (ra, rb, (mut ar, _aw), (_br, mut bw)) = both(
            cfg("r0", "alpha", "beta", b"s3cret"),
            cfg("r0", "beta", "alpha", b"s3cret"),
        )
        .await;
        ra.unwrap();
        rb.unwrap();
        write_message(&mut bw, &Message::Ping).await.unwrap();
        assert_eq!(ar.next().await.unwrap().unwrap(), Message::Ping);
    }

    #[tokio::test]
    async fn different_secrets_fail_on_both_sides_naming_the_shared_secret() {
        let (ra, rb, ..) = both(
            cfg("r0", "alpha", "beta", b"one"),
            cfg("r0", "beta", "alpha", b"two"),
        )
        .await;
        for (err, peer) in [(ra.unwrap_err(), "beta"), (rb.unwrap_err(), "alpha")] {
            assert!(
                matches!(&err, HandshakeError::PeerFailedAuth { peer: p } | HandshakeError::RefusedByPeer { peer: p, .. } if p == peer),
                "{err}"
            );
            assert!(err.to_string().contains("shared-secret"), "{err}");
        }
    }

    #[tokio::test]
    async fn peer_refusing_us_is_reported_with_its_reason() {
        // The peer knows the secret (so it passes our check) but refuses
        // ours anyway: what an asymmetric failure looks like.
        let ((mut ar, mut aw), (mut br, mut bw)) = pair();
        let a = cfg("r0", "alpha", "beta", b"s3cret");
        let peer = async {
            write_message(
                &mut bw,
                &Message::Hello {
                    version: PROTOCOL_VERSION,
                    resource: "r0".into(),
                    node: "beta".into(),
                },
            )
            .await
            .unwrap();
            let nonce = [4; 32];
            write_message(&mut bw, &Message::AuthChallenge { nonce })
                .await
                .unwrap();
            assert!(matches!(
                br.next().await.unwrap(),
                Some(Message::Hello { .. })
            ));
            let Some(Message::AuthChallenge { nonce: theirs }) = br.next().await.unwrap() else {
                panic!()
            };
            let mac = auth_mac(b"s3cret", "r0", "beta", &theirs);
            write_message(&mut bw, &Message::AuthResponse { mac })
                .await
                .unwrap();
            write_message(
                &mut bw,
                &Message::AuthFailed {
                    reason: AUTH_FAILED_REASON.into(),
                },
            )
            .await
            .unwrap();
        };
        let (res, ()) = tokio::join!(handshake(&mut ar, &mut aw, &a), peer);
        let err = res.unwrap_err();
        assert!(
            matches!(&err, HandshakeError::RefusedByPeer { peer, .. } if peer == "beta"),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "peer beta refused our authentication: HMAC response did not verify: the shared-secret differs"
        );
    }

    #[tokio::test]
    async fn a_reflected_challenge_does_not_authenticate() {
        // An attacker without the secret echoes our nonce as its challenge
        // and replays our own answer: the responder name in the MAC differs.
        let ((mut ar, mut aw), (mut br, mut bw)) = pair();
        let a = cfg("r0", "alpha", "beta", b"s3cret");
        let attacker = async {
            let Some(Message::Hello { resource, .. }) = br.next().await.unwrap() else {
                panic!()
            };
            write_message(
                &mut bw,
                &Message::Hello {
                    version: PROTOCOL_VERSION,
                    resource,
                    node: "beta".into(),
                },
            )
            .await
            .unwrap();
            let Some(Message::AuthChallenge { nonce }) = br.next().await.unwrap() else {
                panic!()
            };
            write_message(&mut bw, &Message::AuthChallenge { nonce })
                .await
                .unwrap();
            let Some(Message::AuthResponse { mac }) = br.next().await.unwrap() else {
                panic!()
            };
            write_message(&mut bw, &Message::AuthResponse { mac })
                .await
                .unwrap();
            br.next().await.unwrap()
        };
        let (res, verdict) = tokio::join!(handshake(&mut ar, &mut aw, &a), attacker);
        assert!(
            matches!(res, Err(HandshakeError::PeerFailedAuth { .. })),
            "{res:?}"
        );
        assert!(
            matches!(verdict, Some(Message::AuthFailed { .. })),
            "{verdict:?}"
        );
    }

    #[tokio::test]
    async fn wrong_resource_is_refused_by_both() {
        let (ra, rb, ..) = both(
            cfg("r0", "alpha", "beta", b"s"),
            cfg("r1", "beta", "alpha", b"s"),
        )
        .await;
        let ea = ra.unwrap_err();
        assert!(
            matches!(&ea, HandshakeError::WrongResource { expected, got } if expected == "r0" && got == "r1"),
            "{ea}"
        );
        assert_eq!(
            ea.to_string(),
            "peer is configured for resource \"r1\", this connection is for resource \"r0\""
        );
        assert!(
            matches!(rb, Err(HandshakeError::WrongResource { .. })),
            "{rb:?}"
        );
    }

    #[tokio::test]
    async fn wrong_node_is_refused_and_the_peer_hears_why() {
        // alpha expects gamma; beta expects alpha and so passes its check,
        // then receives alpha's Disconnect.
        let (ra, rb, ..) = both(
            cfg("r0", "alpha", "gamma", b"s"),
            cfg("r0", "beta", "alpha", b"s"),
        )
        .await;
        let ea = ra.unwrap_err();
        assert!(
            matches!(&ea, HandshakeError::WrongNode { expected, got } if expected == "gamma" && got == "beta"),
            "{ea}"
        );
        let eb = rb.unwrap_err();
        assert!(
            matches!(eb, HandshakeError::PeerDisconnected { .. }),
            "{eb}"
        );
        assert_eq!(
            eb.to_string(),
            "peer alpha ended the handshake: alpha expects its peer to be \"gamma\", not \"beta\""
        );
    }

    #[tokio::test]
    async fn own_name_is_refused() {
        let (ra, _rb, ..) = both(
            cfg("r0", "alpha", "alpha", b"s"),
            cfg("r0", "alpha", "alpha", b"s"),
        )
        .await;
        let ea = ra.unwrap_err();
        assert!(matches!(ea, HandshakeError::SameName { .. }), "{ea}");
    }

    #[tokio::test]
    async fn version_mismatch_is_refused_with_both_versions() {
        let ((mut ar, mut aw), (mut br, mut bw)) = pair();
        let a = cfg("r0", "alpha", "beta", b"s");
        let newer = async {
            write_message(
                &mut bw,
                &Message::Hello {
                    version: PROTOCOL_VERSION + 1,
                    resource: "r0".into(),
                    node: "beta".into(),
                },
            )
            .await
            .unwrap();
            let hello = br.next().await.unwrap();
            let bye = br.next().await.unwrap();
            (hello, bye)
        };
        let (res, (hello, bye)) = tokio::join!(handshake(&mut ar, &mut aw, &a), newer);
        let err = res.unwrap_err();
        assert!(
            matches!(
                err,
                HandshakeError::VersionMismatch {
                    ours: PROTOCOL_VERSION,
                    theirs
                } if theirs == PROTOCOL_VERSION + 1
            ),
            "{err}"
        );
        let newer = format!("version {}", PROTOCOL_VERSION + 1);
        assert!(err.to_string().contains(&newer), "{err}");
        assert!(matches!(
            hello,
            Some(Message::Hello {
                version: PROTOCOL_VERSION,
                ..
            })
        ));
        assert_eq!(
            bye,
            Some(Message::Disconnect {
                reason: format!(
                    "alpha speaks wire protocol version {PROTOCOL_VERSION}, not {}",
                    PROTOCOL_VERSION + 1
                )
            })
        );
    }

    #[tokio::test]
    async fn unexpected_message_and_early_close_are_errors() {
        let ((mut ar, mut aw), (_br, mut bw)) = pair();
        write_message(&mut bw, &Message::Ping).await.unwrap();
        let err = handshake(&mut ar, &mut aw, &cfg("r0", "alpha", "beta", b"s"))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                HandshakeError::Unexpected {
                    expected: "Hello",
                    got: "Ping"
                }
            ),
            "{err}"
        );

        let ((mut ar, mut aw), (br, bw)) = pair();
        drop((br, bw));
        let err = handshake(&mut ar, &mut aw, &cfg("r0", "alpha", "beta", b"s"))
            .await
            .unwrap_err();
        // Our Hello may fail to send (broken pipe) or the read sees EOF:
        // either way nothing answered, which the link logs as routine.
        assert!(matches!(err, HandshakeError::Unanswered), "{err}");
        assert!(err.is_unanswered());

        // A peer that said hello and then hung up did answer: that stays an
        // error worth a warning.
        let ((mut ar, mut aw), (br, mut bw)) = pair();
        let hello = Message::Hello {
            version: PROTOCOL_VERSION,
            resource: "r0".into(),
            node: "beta".into(),
        };
        write_message(&mut bw, &hello).await.unwrap();
        drop((br, bw));
        let err = handshake(&mut ar, &mut aw, &cfg("r0", "alpha", "beta", b"s"))
            .await
            .unwrap_err();
        assert!(!err.is_unanswered(), "{err}");
    }

    #[test]
    fn printable_escapes_control_characters() {
        assert!(matches!(printable("plain ✓"), Cow::Borrowed("plain ✓")));
        assert_eq!(printable("a\nb\x1b[31m"), "a\\nb\\u{1b}[31m");
    }
}
