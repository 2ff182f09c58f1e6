//! The CRI container log format, one record per line:
//! `2016-10-06T00:17:09.669794202Z stdout F content`, as containerd's CRI plugin writes it and
//! the kubelet reads it.
//!
//! A line longer than [`MAX_LINE_CONTENT`] is cut into `P` (partial) records of that size
//! followed by one `F` (full) record; content without a final newline at the end of a stream
//! is written as a `P` record, so a reader gives back exactly the bytes the container wrote.

use std::fmt;

use jiff::Timestamp;

/// The most content bytes one record holds, containerd's default `max_container_log_line_size`.
pub const MAX_LINE_CONTENT: usize = 16 * 1024;

/// A container output stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }

    /// A small index for per-stream arrays.
    pub(crate) fn index(self) -> usize {
        match self {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        }
    }
}

/// Whether a record ends its line (`F`) or the line goes on in the next record of the same
/// stream (`P`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tag {
    Partial,
    Full,
}

impl Tag {
    pub fn as_str(self) -> &'static str {
        match self {
            Tag::Partial => "P",
            Tag::Full => "F",
        }
    }
}

/// Appends `timestamp` in UTC with nine fraction digits (Go's `RFC3339NanoFixed`), the form
/// the kubelet prints with `timestamps=true`.
pub fn write_timestamp(out: &mut Vec<u8>, timestamp: Timestamp) {
    use std::io::Write as _;
    let civil = jiff::tz::Offset::UTC.to_datetime(timestamp);
    // Writing into a Vec cannot fail.
    let _ = write!(
        out,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}Z",
        civil.year(),
        civil.month(),
        civil.day(),
        civil.hour(),
        civil.minute(),
        civil.second(),
        civil.subsec_nanosecond()
    );
}

pub fn format_timestamp(timestamp: Timestamp) -> String {
    let mut out = Vec::with_capacity(30);
    write_timestamp(&mut out, timestamp);
    String::from_utf8(out).expect("timestamps are ASCII")
}

/// Appends one record, newline included.
pub fn encode_record(
    out: &mut Vec<u8>,
    timestamp: Timestamp,
    stream: Stream,
    tag: Tag,
    content: &[u8],
) {
    write_timestamp(out, timestamp);
    out.push(b' ');
    out.extend_from_slice(stream.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(tag.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(content);
    out.push(b'\n');
}

/// One parsed record; `content` has no trailing newline.
#[derive(Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub timestamp: Timestamp,
    pub stream: Stream,
    pub tag: Tag,
    pub content: &'a [u8],
}

#[derive(Debug, PartialEq, Eq)]
pub enum ParseError {
    NoTimestamp,
    BadTimestamp(String),
    NoStream,
    BadStream(String),
    NoTag,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::NoTimestamp => write!(f, "timestamp is not found"),
            ParseError::BadTimestamp(text) => write!(f, "unexpected timestamp {text:?}"),
            ParseError::NoStream => write!(f, "stream type is not found"),
            ParseError::BadStream(text) => write!(f, "unexpected stream type {text:?}"),
            ParseError::NoTag => write!(f, "log tag is not found"),
        }
    }
}

impl std::error::Error for ParseError {}

/// Parses one line of a CRI log (with or without its newline). Timestamps are read leniently
/// (any RFC 3339 offset and fraction length); the tag field may carry more `:`-separated tags
/// after the first, which are ignored, as the kubelet does.
pub fn parse_record(line: &[u8]) -> Result<Record<'_>, ParseError> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let (timestamp, rest) = split_field(line).ok_or(ParseError::NoTimestamp)?;
    let timestamp_text = std::str::from_utf8(timestamp)
        .map_err(|_| ParseError::BadTimestamp(String::from_utf8_lossy(timestamp).into_owned()))?;
    let timestamp: Timestamp = timestamp_text
        .parse()
        .map_err(|_| ParseError::BadTimestamp(timestamp_text.to_string()))?;
    let (stream, rest) = split_field(rest).ok_or(ParseError::NoStream)?;
    let stream = match stream {
        b"stdout" => Stream::Stdout,
        b"stderr" => Stream::Stderr,
        other => {
            return Err(ParseError::BadStream(
                String::from_utf8_lossy(other).into_owned(),
            ));
        }
    };
    let (tags, content) = split_field(rest).ok_or(ParseError::NoTag)?;
    let first_tag = tags.split(|&b| b == b':').next().unwrap_or_default();
    let tag = if first_tag == b"P" {
        Tag::Partial
    } else {
        Tag::Full
    };
    Ok(Record {
        timestamp,
        stream,
        tag,
        content,
    })
}

fn split_field(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let space = bytes.iter().position(|&b| b == b' ')?;
    Some((&bytes[..space], &bytes[space + 1..]))
}

/// Cuts one stream's raw output into record contents, as containerd's CRI logger does: a
/// line ends at `\n` (a `\r` before it is dropped), a line longer than the limit becomes
/// `P` records of exactly the limit, and what is left without a newline when the stream
/// closes is flushed by [`LineSplitter::finish`] as a `P` record.
#[derive(Debug)]
pub struct LineSplitter {
    max_content: usize,
    pending: Vec<u8>,
}

impl LineSplitter {
    pub fn new(max_content: usize) -> Self {
        assert!(max_content > 0, "a record must hold at least one byte");
        Self {
            max_content,
            pending: Vec::new(),
        }
    }

    /// Feeds output; `emit` is called for every record that is complete.
    pub fn push(&mut self, mut data: &[u8], mut emit: impl FnMut(Tag, &[u8])) {
        while !data.is_empty() {
            let Some(newline) = data.iter().position(|&b| b == b'\n') else {
                self.append(data, &mut emit);
                return;
            };
            let (segment, rest) = (&data[..newline], &data[newline + 1..]);
            data = rest;
            if self.pending.is_empty() && segment.len() <= self.max_content {
                // The common case: a whole line inside one read, emitted without a copy.
                emit(Tag::Full, segment.strip_suffix(b"\r").unwrap_or(segment));
                continue;
            }
            self.append(segment, &mut emit);
            let line = self.pending.strip_suffix(b"\r").unwrap_or(&self.pending);
            emit(Tag::Full, line);
            self.pending.clear();
        }
    }

    /// The stream closed: flushes a line that never got its newline.
    pub fn finish(&mut self, mut emit: impl FnMut(Tag, &[u8])) {
        if !self.pending.is_empty() {
            emit(Tag::Partial, &self.pending);
            self.pending.clear();
        }
    }

    fn append(&mut self, mut segment: &[u8], emit: &mut impl FnMut(Tag, &[u8])) {
        // containerd cuts a record only once the line is longer than the limit, so a line of
        // exactly the limit stays one `F` record.
        while self.pending.len() + segment.len() > self.max_content {
            let take = self.max_content - self.pending.len();
            self.pending.extend_from_slice(&segment[..take]);
            emit(Tag::Partial, &self.pending);
            self.pending.clear();
            segment = &segment[take..];
        }
        self.pending.extend_from_slice(segment);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(max: usize, chunks: &[&[u8]]) -> Vec<(Tag, Vec<u8>)> {
        let mut splitter = LineSplitter::new(max);
        let mut records = Vec::new();
        for chunk in chunks {
            splitter.push(chunk, |tag, content| records.push((tag, content.to_vec())));
        }
        splitter.finish(|tag, content| records.push((tag, content.to_vec())));
        records
    }

    #[test]
    fn records_round_trip() {
        let timestamp: Timestamp = "2016-10-06T00:17:09.669794202Z".parse().unwrap();
        let mut out = Vec::new();
        encode_record(&mut out, timestamp, Stream::Stderr, Tag::Partial, b"a b  c");
        assert_eq!(
            out,
            b"2016-10-06T00:17:09.669794202Z stderr P a b  c\n".to_vec()
        );
        let record = parse_record(&out).unwrap();
        assert_eq!(
            record,
            Record {
                timestamp,
                stream: Stream::Stderr,
                tag: Tag::Partial,
                content: b"a b  c"
            }
        );
    }

    #[test]
    fn timestamps_are_fixed_width_utc() {
        let timestamp: Timestamp = "2024-02-29T23:59:59.5+01:00".parse().unwrap();
        assert_eq!(
            format_timestamp(timestamp),
            "2024-02-29T22:59:59.500000000Z"
        );
        let whole: Timestamp = "2024-01-01T00:00:00Z".parse().unwrap();
        assert_eq!(format_timestamp(whole), "2024-01-01T00:00:00.000000000Z");
    }

    #[test]
    fn parsing_is_lenient_where_the_kubelet_is() {
        // containerd writes Go's RFC3339Nano: trailing zeros trimmed, local offsets.
        let record = parse_record(b"2016-10-06T02:17:09.6+02:00 stdout F hello").unwrap();
        assert_eq!(
            record.timestamp,
            "2016-10-06T00:17:09.6Z".parse::<Timestamp>().unwrap()
        );
        // Extra tags after the first are ignored; empty content is a valid empty line.
        let record = parse_record(b"2016-10-06T00:17:09Z stdout F:x:y \n").unwrap();
        assert_eq!((record.tag, record.content), (Tag::Full, &b""[..]));
        assert_eq!(parse_record(b"garbage"), Err(ParseError::NoTimestamp));
        assert!(matches!(
            parse_record(b"yesterday stdout F x"),
            Err(ParseError::BadTimestamp(_))
        ));
        assert!(matches!(
            parse_record(b"2016-10-06T00:17:09Z stdin F x"),
            Err(ParseError::BadStream(_))
        ));
        assert_eq!(
            parse_record(b"2016-10-06T00:17:09Z stdout"),
            Err(ParseError::NoStream)
        );
        assert_eq!(
            parse_record(b"2016-10-06T00:17:09Z stdout F"),
            Err(ParseError::NoTag)
        );
    }

    #[test]
    fn lines_split_like_containerd() {
        use Tag::{Full, Partial};
        // Lines across reads, CRLF, an empty line.
        assert_eq!(
            split(8, &[b"ab", b"c\r\nd\n\nef"]),
            vec![
                (Full, b"abc".to_vec()),
                (Full, b"d".to_vec()),
                (Full, b"".to_vec()),
                (Partial, b"ef".to_vec()),
            ]
        );
        // Exactly the limit stays whole; one byte more is cut.
        assert_eq!(split(4, &[b"abcd\n"]), vec![(Full, b"abcd".to_vec())]);
        assert_eq!(
            split(4, &[b"abcde\n"]),
            vec![(Partial, b"abcd".to_vec()), (Full, b"e".to_vec())]
        );
        // A long line arriving in pieces is cut at the same places.
        assert_eq!(
            split(4, &[b"ab", b"cdefghi", b"j\n"]),
            vec![
                (Partial, b"abcd".to_vec()),
                (Partial, b"efgh".to_vec()),
                (Full, b"ij".to_vec()),
            ]
        );
        assert_eq!(
            split(4, &[b"abcdefgh\n"]),
            vec![(Partial, b"abcd".to_vec()), (Full, b"efgh".to_vec())]
        );
        // Nothing pending: nothing flushed.
        assert_eq!(split(4, &[b"ab\n"]), vec![(Full, b"ab".to_vec())]);
    }

    #[test]
    fn default_limit_is_sixteen_kib() {
        let line = vec![b'x'; MAX_LINE_CONTENT * 2 + 10];
        let mut input = line.clone();
        input.push(b'\n');
        let records = split(MAX_LINE_CONTENT, &[&input]);
        let sizes: Vec<_> = records.iter().map(|(t, c)| (*t, c.len())).collect();
        assert_eq!(
            sizes,
            vec![
                (Tag::Partial, 16384),
                (Tag::Partial, 16384),
                (Tag::Full, 10)
            ]
        );
    }
}
