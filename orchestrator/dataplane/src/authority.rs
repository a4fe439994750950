//! Unix socket clients' `:authority`, made acceptable to h2.
//!
//! grpc-core clients (grpc-python, C++, Ruby...) on a `unix:` target send the socket
//! path, percent-encoded, as `:authority` (`%2Frun%2Fmesh.sock`); the `http` crate,
//! and so h2's server, refuses an authority with `%` outside an IPv6 literal and resets
//! every such stream with PROTOCOL_ERROR. A Unix listener therefore reads through
//! [`AuthorityFix`]: it decodes each request header block (HPACK, keeping the client's
//! dynamic table), replaces an invalid `:authority` by `localhost`, and re-encodes the
//! block with literal fields only, so h2's decoder never needs a dynamic table entry
//! it did not see. Every other frame passes through untouched.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE_LEN: usize = 24;
const FRAME_HEADER: usize = 9;
/// h2's default SETTINGS_MAX_FRAME_SIZE, which the data plane's server keeps.
const MAX_FRAME: usize = 16_384;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

struct Pending {
    stream: u32,
    end_stream: bool,
    block: Vec<u8>,
    /// The frames as received, sent on if the block cannot be decoded.
    raw: Vec<u8>,
}

/// An I/O stream whose read side has request header blocks rewritten (see the module).
pub struct AuthorityFix<T> {
    inner: T,
    decoder: loona_hpack::Decoder<'static>,
    preface_left: usize,
    raw: BytesMut,
    ready: BytesMut,
    pending: Option<Pending>,
    eof: bool,
}

impl<T> AuthorityFix<T> {
    pub fn new(inner: T) -> Self {
        AuthorityFix {
            inner,
            decoder: loona_hpack::Decoder::new(),
            preface_left: PREFACE_LEN,
            raw: BytesMut::with_capacity(16 * 1024),
            ready: BytesMut::new(),
            pending: None,
            eof: false,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// Moves every complete frame from `raw` to `ready`, rewriting header blocks.
    fn process(&mut self) {
        if self.preface_left > 0 {
            let n = self.preface_left.min(self.raw.len());
            let preface = self.raw.split_to(n);
            self.ready.extend_from_slice(&preface);
            self.preface_left -= n;
            if self.preface_left > 0 {
                return;
            }
        }
        while self.raw.len() >= FRAME_HEADER {
            let len = (usize::from(self.raw[0]) << 16)
                | (usize::from(self.raw[1]) << 8)
                | usize::from(self.raw[2]);
            if self.raw.len() < FRAME_HEADER + len {
                return;
            }
            let frame = self.raw.split_to(FRAME_HEADER + len);
            let (kind, flags) = (frame[3], frame[4]);
            let stream = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
            match kind {
                HEADERS => {
                    let payload = &frame[FRAME_HEADER..];
                    let mut start = 0;
                    let mut end = payload.len();
                    if flags & PADDED != 0 && !payload.is_empty() {
                        start = 1;
                        end = end.saturating_sub(usize::from(payload[0]));
                    }
                    if flags & PRIORITY != 0 {
                        start += 5;
                    }
                    if start > end {
                        self.ready.extend_from_slice(&frame); // malformed: h2 will say so
                        continue;
                    }
                    let pending = Pending {
                        stream,
                        end_stream: flags & END_STREAM != 0,
                        block: payload[start..end].to_vec(),
                        raw: frame.to_vec(),
                    };
                    if flags & END_HEADERS != 0 {
                        self.emit(pending);
                    } else {
                        self.pending = Some(pending);
                    }
                }
                CONTINUATION if self.pending.as_ref().is_some_and(|p| p.stream == stream) => {
                    let mut pending = self.pending.take().unwrap_or_else(|| unreachable!());
                    pending.block.extend_from_slice(&frame[FRAME_HEADER..]);
                    pending.raw.extend_from_slice(&frame);
                    if flags & END_HEADERS != 0 {
                        self.emit(pending);
                    } else {
                        self.pending = Some(pending);
                    }
                }
                _ => {
                    if let Some(pending) = self.pending.take() {
                        self.ready.extend_from_slice(&pending.raw); // protocol error: h2's to report
                    }
                    self.ready.extend_from_slice(&frame);
                }
            }
        }
    }

    fn emit(&mut self, pending: Pending) {
        let Ok(fields) = self.decoder.decode(&pending.block) else {
            self.ready.extend_from_slice(&pending.raw);
            return;
        };
        let mut block = Vec::with_capacity(pending.block.len() * 2);
        for (name, value) in fields {
            let value = if name == b":authority"
                && http::uri::Authority::try_from(value.as_slice()).is_err()
            {
                b"localhost".to_vec()
            } else {
                value
            };
            literal(&mut block, &name, &value);
        }
        write_frames(&mut self.ready, pending.stream, pending.end_stream, &block);
    }
}

/// A literal header field without indexing, new name, no Huffman coding.
fn literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0);
    integer(out, name.len(), 7, 0);
    out.extend_from_slice(name);
    integer(out, value.len(), 7, 0);
    out.extend_from_slice(value);
}

/// An HPACK integer with an `n`-bit prefix.
fn integer(out: &mut Vec<u8>, mut value: usize, n: u32, first: u8) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128 + 128) as u8);
        value /= 128;
    }
    out.push(value as u8);
}

fn write_frames(out: &mut BytesMut, stream: u32, end_stream: bool, block: &[u8]) {
    let mut chunks = block.chunks(MAX_FRAME).peekable();
    let mut first = true;
    if block.is_empty() {
        frame_header(
            out,
            0,
            HEADERS,
            END_HEADERS | if end_stream { END_STREAM } else { 0 },
            stream,
        );
        return;
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        let (kind, mut flags) = if first {
            (HEADERS, if end_stream { END_STREAM } else { 0 })
        } else {
            (CONTINUATION, 0)
        };
        if last {
            flags |= END_HEADERS;
        }
        frame_header(out, chunk.len(), kind, flags, stream);
        out.extend_from_slice(chunk);
        first = false;
    }
}

fn frame_header(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
    out.put_uint(len as u64, 3);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream);
}

impl<T: AsyncRead + Unpin> AsyncRead for AuthorityFix<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // What is left is no complete frame: pass it on for h2 to judge.
                if !this.raw.is_empty() {
                    let rest = this.raw.split();
                    this.ready.extend_from_slice(&rest);
                    continue;
                }
                return Poll::Ready(Ok(()));
            }
            this.raw.reserve(16 * 1024);
            let mut chunk = [0u8; 16 * 1024];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    if read.filled().is_empty() {
                        this.eof = true;
                    } else {
                        this.raw.extend_from_slice(read.filled());
                        this.process();
                    }
                }
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn headers_frame(stream: u32, flags: u8, block: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        frame_header(&mut out, block.len(), HEADERS, flags, stream);
        out.extend_from_slice(block);
        out.to_vec()
    }

    fn decode_all(bytes: &[u8]) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut decoder = loona_hpack::Decoder::new();
        let mut rest = &bytes[PREFACE_LEN..];
        let mut blocks = Vec::new();
        let mut block = Vec::new();
        while rest.len() >= FRAME_HEADER {
            let len =
                (usize::from(rest[0]) << 16) | (usize::from(rest[1]) << 8) | usize::from(rest[2]);
            let (kind, flags) = (rest[3], rest[4]);
            if kind == HEADERS || kind == CONTINUATION {
                block.extend_from_slice(&rest[FRAME_HEADER..FRAME_HEADER + len]);
                if flags & END_HEADERS != 0 {
                    blocks.push(decoder.decode(&block).unwrap());
                    block.clear();
                }
            }
            rest = &rest[FRAME_HEADER + len..];
        }
        blocks
    }

    #[tokio::test]
    async fn a_percent_encoded_path_becomes_localhost_and_the_rest_stays() {
        let mut encoder = loona_hpack::Encoder::new();
        let path: &[u8] = b"%2Frun%2Fmesh.sock";
        let first = encoder.encode([
            (&b":authority"[..], path),
            (b":path", b"/a.B/C"),
            (b"x-big", &[b'v'; 20_000][..]),
        ]);
        // The second block refers to the first one's dynamic table entries.
        let second = encoder.encode([(&b":authority"[..], path), (b":path", b"/a.B/C")]);
        let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        input.extend(headers_frame(1, END_HEADERS, &first));
        input.extend([0, 0, 1, 0, 1, 0, 0, 0, 1, 7]); // DATA on stream 1, END_STREAM
        input.extend(headers_frame(3, END_HEADERS | END_STREAM, &second));
        let (mut client, server) = tokio::io::duplex(1 << 20);
        client.write_all(&input).await.unwrap();
        drop(client);
        let mut fixed = AuthorityFix::new(server);
        let mut out = Vec::new();
        fixed.read_to_end(&mut out).await.unwrap();
        let blocks = decode_all(&out);
        assert_eq!(blocks.len(), 2);
        assert_eq!(
            blocks[0][0],
            (b":authority".to_vec(), b"localhost".to_vec())
        );
        assert_eq!(blocks[0][2].1.len(), 20_000);
        assert_eq!(
            blocks[1],
            vec![
                (b":authority".to_vec(), b"localhost".to_vec()),
                (b":path".to_vec(), b"/a.B/C".to_vec())
            ]
        );
        assert!(out.windows(10).any(|w| w == [0, 0, 1, 0, 1, 0, 0, 0, 1, 7]));
    }

    #[test]
    fn hpack_integers() {
        let mut out = Vec::new();
        integer(&mut out, 10, 7, 0);
        integer(&mut out, 1337, 5, 0);
        assert_eq!(out, vec![10, 31, 154, 10]);
    }
}
