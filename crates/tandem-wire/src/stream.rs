//! Framing over tokio streams: a bounded frame reader and a frame writer.

use crate::frame::{
    bulk_head_end, decode, decode_bulk_head, encode, encode_head, frame_len, HEADER_LEN,
};
use crate::{Message, WireError, MAX_DATA};
use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// How much the reader asks the socket for when it does not yet know how
/// much it needs (or needs less): large enough that a stream of small acks
/// costs one read call per many frames, small next to a maximal frame.
const READ_CHUNK: usize = 64 * 1024;

/// Payloads up to this size are copied next to their header so the frame
/// goes out in one write; larger ones are written from their own buffer,
/// since copying megabytes costs more than a second write call.
const COPY_LIMIT: usize = 64 * 1024;

/// What [`FrameReader::next_frame`] returns.
#[derive(Debug)]
pub enum Frame {
    /// A whole message.
    Whole(Message),
    /// A `Data` or `RsData` message whose `data` holds only the payload
    /// bytes already read; `rest` more follow in the stream.
    Bulk {
        /// The message with the first part of its payload.
        head: Message,
        /// Payload bytes still in the stream.
        rest: usize,
    },
}

/// Reads whole frames from a stream.
///
/// Bounded: the buffer never holds more than the current frame or
/// 64 KiB, whichever is larger, so at most one maximal frame
/// ([`crate::HEADER_LEN`] + [`crate::MAX_BODY`]). A header announcing more
/// than its type allows fails before its body is read.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    /// The last frame was bulk, so the next one likely is too: a read
    /// with no header in the buffer stops where its fixed fields would,
    /// leaving its payload in the stream for the caller to splice instead
    /// of copying up to [`READ_CHUNK`] of it through memory.
    expect_bulk: bool,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader over `r` with an empty buffer.
    pub fn new(r: R) -> Self {
        Self {
            inner: r,
            buf: BytesMut::new(),
            expect_bulk: false,
        }
    }

    /// The next message; `Ok(None)` when the peer closed the stream cleanly
    /// between frames.
    ///
    /// Cancel-safe: bytes read so far stay buffered if the future is
    /// dropped (e.g. losing a `tokio::select!` against a timer), and the
    /// next call continues where this one stopped.
    pub async fn next(&mut self) -> Result<Option<Message>, WireError> {
        loop {
            if let Some(msg) = decode(&mut self.buf)? {
                return Ok(Some(msg));
            }
            if !self.fill(usize::MAX).await? {
                return Ok(None);
            }
        }
    }

    /// One read towards the frame at the front of the buffer (decoding
    /// found none whole, so the buffer holds part of one frame); false at a
    /// clean end of stream between frames. Reads at most up to the end of
    /// that frame, or a chunk when that is more: this is what keeps the
    /// buffer bounded. Cancel-safe: one read.
    /// A frame whose payload of at least `bulk_min` bytes is to be
    /// spliced is read only up to the end of its fixed fields.
    async fn fill(&mut self, bulk_min: usize) -> Result<bool, WireError> {
        let frame_end = frame_len(&self.buf)?.unwrap_or(HEADER_LEN);
        let mut want = frame_end.max(READ_CHUNK).saturating_sub(self.buf.len());
        if let Some(end) = bulk_head_end(&self.buf, bulk_min, self.expect_bulk)? {
            if end > self.buf.len() {
                want = want.min(end - self.buf.len());
            }
        }
        self.buf.reserve(want);
        let n = self
            .inner
            .read_buf(&mut (&mut self.buf).limit(want))
            .await?;
        if n == 0 {
            return if self.buf.is_empty() {
                Ok(false)
            } else {
                Err(WireError::ClosedMidFrame {
                    buffered: self.buf.len(),
                })
            };
        }
        Ok(true)
    }

    /// Like [`FrameReader::next`], but a `Data` (without checksum) or
    /// `RsData` frame with a payload of at least `bulk_min` bytes comes back
    /// as [`Frame::Bulk`] as soon as its fixed fields are in: the caller
    /// then takes the rest of the payload from the stream itself (with
    /// `splice`, say), and must take exactly that many bytes before the
    /// next call. Cancel-safe like `next`.
    pub async fn next_frame(&mut self, bulk_min: usize) -> Result<Option<Frame>, WireError> {
        loop {
            if let Some(msg) = decode(&mut self.buf)? {
                self.expect_bulk = false;
                return Ok(Some(Frame::Whole(msg)));
            }
            if let Some((head, rest)) = decode_bulk_head(&mut self.buf, bulk_min)? {
                self.expect_bulk = true;
                return Ok(Some(Frame::Bulk { head, rest }));
            }
            if !self.fill(bulk_min).await? {
                return Ok(None);
            }
        }
    }

    /// The stream, for taking a bulk payload's rest ([`Frame::Bulk`]).
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The stream, for taking a bulk payload's rest ([`Frame::Bulk`]).
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// The next message if it is already whole in the buffer, without
    /// reading: lets a caller hand on every frame one read brought in as
    /// one batch.
    pub fn next_buffered(&mut self) -> Result<Option<Message>, WireError> {
        decode(&mut self.buf)
    }

    /// The underlying stream. Bytes already read but not yet decoded are
    /// lost, so call this only between conversations (e.g. after EOF).
    pub fn into_inner(self) -> R {
        self.inner
    }
}

/// Encode `msg` and write it to `w`, then flush.
///
/// The flush costs nothing on a TCP stream but matters for buffered
/// writers, where a frame left in a buffer would stall the peer. Not
/// cancel-safe: a dropped future may leave part of a frame written, after
/// which the connection must be closed.
pub async fn write_message<W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &Message,
) -> Result<(), WireError> {
    let mut buf = BytesMut::new();
    match msg {
        _ if msg.payload().is_some_and(|d| d.len() > MAX_DATA) => {
            return Err(WireError::PayloadTooLarge {
                len: msg.payload().map_or(0, |d| d.len()),
            });
        }
        _ if msg.payload().is_some_and(|d| d.len() > COPY_LIMIT) => {
            let data = msg.payload().map(|d| d.as_ref()).unwrap_or_default();
            encode_head(msg, &mut buf);
            w.write_all(&buf).await?;
            w.write_all(data).await?;
        }
        _ => {
            encode(msg, &mut buf);
            w.write_all(&buf).await?;
        }
    }
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{data_crc, MAGIC};
    use bytes::Bytes;

    /// Large payloads without a checksum stop at their head; the caller
    /// reads the rest itself and the stream stays in step. Checksummed and
    /// small payloads come whole.
    #[tokio::test]
    async fn bulk_frames_stop_after_their_head_and_the_stream_stays_in_step() {
        let (mut a, b) = tokio::io::duplex(8192);
        let big: Bytes = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let msgs = vec![
            Message::Data {
                seq: 1,
                epoch: 1,
                offset: 4096,
                fua: true,
                crc: None,
                data: big.clone(),
            },
            Message::Data {
                seq: 2,
                epoch: 1,
                offset: 0,
                fua: false,
                crc: Some(data_crc(&big)),
                data: big.clone(),
            },
            Message::RsData {
                id: 7,
                offset: 1 << 20,
                data: big.clone(),
            },
            Message::RsData {
                id: 8,
                offset: 0,
                data: Bytes::from_static(b"small"),
            },
            Message::Ping,
        ];
        let sent = msgs.clone();
        let writer = tokio::spawn(async move {
            for m in &sent {
                write_message(&mut a, m).await.unwrap();
            }
        });
        let mut r = FrameReader::new(b);
        let mut got = Vec::new();
        while let Some(f) = r.next_frame(64 * 1024).await.unwrap() {
            match f {
                Frame::Whole(m) => got.push((m, false)),
                Frame::Bulk { mut head, rest } => {
                    assert!(rest > 0 && r.buf.is_empty());
                    let mut tail = vec![0; rest];
                    r.get_mut().read_exact(&mut tail).await.unwrap();
                    match &mut head {
                        Message::Data { data, .. } | Message::RsData { data, .. } => {
                            assert_eq!(data.len() + rest, big.len());
                            let mut all = data.to_vec();
                            all.extend_from_slice(&tail);
                            *data = Bytes::from(all);
                        }
                        other => panic!("bulk head of {other:?}"),
                    }
                    got.push((head, true));
                }
            }
        }
        writer.await.unwrap();
        let bulk: Vec<bool> = got.iter().map(|g| g.1).collect();
        assert_eq!(bulk, [true, false, true, false, false]);
        let got: Vec<Message> = got.into_iter().map(|g| g.0).collect();
        assert_eq!(got, msgs);
    }

    /// Behind a bulk frame the reader reads only the next frame's fixed
    /// fields: a bulk frame's payload stays in the stream for the caller
    /// to splice (none of it copied into the buffer), for `Data` and
    /// `RsData` alike, and small frames among them still come whole.
    #[tokio::test]
    async fn behind_a_bulk_frame_the_next_payload_stays_in_the_stream() {
        // Room for everything at once, so only the reader limits its reads.
        let (mut a, b) = tokio::io::duplex(4 << 20);
        let big: Bytes = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let data = |seq| Message::Data {
            seq,
            epoch: 1,
            offset: seq * 4096,
            fua: false,
            crc: None,
            data: big.clone(),
        };
        // A ping between them (read with the next frame's first bytes)
        // does not make the reader take the next payload into memory.
        let msgs = vec![
            data(1),
            data(2),
            Message::Ping,
            Message::RsData {
                id: 3,
                offset: 0,
                data: big.clone(),
            },
            Message::Ping,
            data(4),
            Message::Ping,
        ];
        for m in &msgs {
            write_message(&mut a, m)
                .await
                .expect("the duplex holds every frame");
        }
        drop(a);
        let mut r = FrameReader::new(b);
        let mut heads = Vec::new();
        let mut got = Vec::new();
        while let Some(f) = r.next_frame(64 * 1024).await.expect("a valid frame") {
            match f {
                Frame::Whole(m) => got.push(m),
                Frame::Bulk { mut head, rest } => {
                    let mut tail = vec![0; rest];
                    r.get_mut()
                        .read_exact(&mut tail)
                        .await
                        .expect("the payload's rest");
                    if let Message::Data { data, .. } | Message::RsData { data, .. } = &mut head {
                        heads.push(data.len());
                        let mut all = data.to_vec();
                        all.extend_from_slice(&tail);
                        *data = Bytes::from(all);
                    }
                    got.push(head);
                }
            }
        }
        assert_eq!(got, msgs);
        assert_eq!(heads.len(), 4, "every large frame came as bulk: {heads:?}");
        assert_eq!(
            heads[1..],
            [0, 0, 0],
            "payload bytes read behind the first: {heads:?}"
        );
    }

    #[tokio::test]
    async fn messages_cross_a_stream_and_eof_between_frames_is_clean() {
        let (mut a, b) = tokio::io::duplex(1024);
        let big = Bytes::from(vec![0x5a; 300_000]);
        let msgs = vec![
            Message::Ping,
            Message::Data {
                seq: 1,
                epoch: 1,
                offset: 0,
                fua: false,
                crc: Some(data_crc(&big)),
                data: big.clone(),
            },
            Message::Data {
                seq: 2,
                epoch: 1,
                offset: 0,
                fua: true,
                crc: None,
                data: Bytes::from_static(b"small"),
            },
            Message::Barrier {
                epoch: 1,
                flush: true,
            },
        ];
        let sent = msgs.clone();
        let writer = tokio::spawn(async move {
            for m in &sent {
                write_message(&mut a, m).await.unwrap();
            }
        });
        let mut r = FrameReader::new(b);
        for m in &msgs {
            assert_eq!(&r.next().await.unwrap().unwrap(), m);
            assert!(r.buf.len() <= READ_CHUNK.max(HEADER_LEN + big.len() + 30));
        }
        writer.await.unwrap();
        assert!(r.next().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn eof_inside_a_frame_is_an_error() {
        let mut frame = BytesMut::new();
        encode(&Message::RecvAck { seq: 9 }, &mut frame);
        let (mut a, b) = tokio::io::duplex(1024);
        a.write_all(&frame[..frame.len() - 3]).await.unwrap();
        drop(a);
        let err = FrameReader::new(b).next().await.unwrap_err();
        assert!(
            matches!(err, WireError::ClosedMidFrame { buffered: 17 }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn oversized_header_fails_before_the_body_is_read() {
        let (mut a, b) = tokio::io::duplex(1024);
        let mut h = BytesMut::new();
        h.put_u32_le(MAGIC);
        h.put_u16_le(0x0020);
        h.put_u16_le(0);
        h.put_u32_le(u32::MAX);
        a.write_all(&h).await.unwrap();
        // The writer stays open: the reader must not wait for the body.
        let mut r = FrameReader::new(b);
        let err = r.next().await.unwrap_err();
        assert!(matches!(err, WireError::FrameTooLarge { .. }), "{err}");
        assert!(
            r.buf.capacity() <= 2 * READ_CHUNK,
            "capacity {}",
            r.buf.capacity()
        );
    }

    #[tokio::test]
    async fn a_maximal_data_frame_is_read_and_the_buffer_stays_bounded() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let data = Bytes::from(vec![0xa5; MAX_DATA]);
        let msg = Message::Data {
            seq: 7,
            epoch: 1,
            offset: 0,
            fua: false,
            crc: None,
            data,
        };
        let sent = msg.clone();
        let writer = tokio::spawn(async move {
            write_message(&mut a, &sent).await.unwrap();
            write_message(&mut a, &Message::Ping).await.unwrap();
        });
        let mut r = FrameReader::new(b);
        assert_eq!(r.next().await.unwrap().unwrap(), msg);
        assert!(r.buf.len() <= crate::HEADER_LEN + crate::MAX_BODY);
        assert_eq!(r.next().await.unwrap().unwrap(), Message::Ping);
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn oversized_payload_is_refused_by_the_writer() {
        let (mut a, _b) = tokio::io::duplex(64);
        let data = Bytes::from(vec![0; MAX_DATA + 1]);
        let err = write_message(
            &mut a,
            &Message::Data {
                seq: 0,
                epoch: 0,
                offset: 0,
                fua: false,
                data,
                crc: None,
            },
        )
        .await
        .unwrap_err();
        assert!(matches!(err, WireError::PayloadTooLarge { .. }), "{err}");
    }

    #[tokio::test]
    async fn next_is_cancel_safe() {
        let (mut a, b) = tokio::io::duplex(1024);
        let mut frame = BytesMut::new();
        encode(&Message::WriteAck { seq: 5 }, &mut frame);
        let mut r = FrameReader::new(b);
        a.write_all(&frame[..10]).await.unwrap();
        // The first attempt is cancelled while the frame is incomplete.
        let cancelled = tokio::time::timeout(std::time::Duration::from_millis(20), r.next()).await;
        assert!(cancelled.is_err());
        a.write_all(&frame[10..]).await.unwrap();
        assert_eq!(
            r.next().await.unwrap().unwrap(),
            Message::WriteAck { seq: 5 }
        );
    }
}
