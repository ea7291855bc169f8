//! What the tracer and its stack helper say to each other over two pipes:
//! frames of a 4-byte little-endian length and that many bytes of JSON.
//! Both sides bound what they read: the helper reads memory a hostile
//! target controls, so the tracer trusts its answers no further than the
//! bounds checked here.
use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

use super::pystack::{Captured, MAX_FRAMES, MAX_THREADS};
use crate::model::{PyFrame, PyThread};

/// Longest request (a few numbers).
pub const MAX_REQUEST: usize = 256;
/// Longest answer: MAX_THREADS + 1 threads of MAX_FRAMES frames, two names
/// of MAX_TEXT bytes each (JSON escapes at most double them), with room.
pub const MAX_REPLY: usize = 8 << 20;
/// Longest function or file name kept (bytes).
pub const MAX_TEXT: usize = 512;
/// Longest error text accepted from the helper (bytes).
pub const MAX_ERROR_TEXT: usize = 400;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Set `pid`'s reader up ahead of its first stall.
    Open {
        pid: u32,
    },
    /// Drop `pid`'s reader (it exited; the pid may come back).
    Forget {
        pid: u32,
    },
    Capture {
        pid: u32,
        tid: u32,
        all: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Frame {
    pub function: String,
    pub file: String,
    pub line: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Thread {
    pub tid: Option<u32>,
    pub frames: Vec<Frame>,
    pub omitted: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// An Open or Forget was done (an Open that failed is tried again at
    /// the capture, which says why).
    Done,
    Stack {
        frames: Vec<Frame>,
        omitted: u64,
        others: Option<Vec<Thread>>,
    },
    Error(String),
}

pub fn write_frame(w: &mut impl Write, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len()).map_err(|_| io::Error::other("frame too long"))?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(payload)?;
    w.flush()
}

/// One frame of at most `max` bytes; a longer one is an error (the stream
/// is then out of step and is not read further).
pub fn read_frame(r: &mut impl Read, max: usize) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(io::Error::other(format!(
            "a frame of {len} bytes (at most {max})"
        )));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

/// `s` cut to at most `max` bytes, on a character boundary, marked.
pub fn cut(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

fn frame_out(f: &PyFrame) -> Frame {
    Frame {
        function: cut(f.function.clone(), MAX_TEXT),
        file: cut(f.file.clone(), MAX_TEXT),
        line: f.line,
    }
}

/// The helper's side: a capture as it is sent (names cut).
pub fn to_reply(r: Result<Captured, String>) -> Reply {
    match r {
        Ok(c) => Reply::Stack {
            frames: c.frames.iter().map(frame_out).collect(),
            omitted: c.omitted,
            others: c.others.map(|ts| {
                ts.iter()
                    .map(|t| Thread {
                        tid: t.tid,
                        frames: t.frames.iter().map(frame_out).collect(),
                        omitted: t.omitted,
                    })
                    .collect()
            }),
        },
        Err(e) => Reply::Error(cut(e, MAX_ERROR_TEXT)),
    }
}

fn frames_in(fs: Vec<Frame>) -> Result<Vec<PyFrame>, String> {
    if fs.len() > MAX_FRAMES {
        return Err(format!("{} frames (at most {MAX_FRAMES})", fs.len()));
    }
    fs.into_iter()
        .map(|f| {
            if f.function.len() > MAX_TEXT + 3 || f.file.len() > MAX_TEXT + 3 {
                return Err("a name longer than its bound".to_string());
            }
            Ok(PyFrame {
                function: f.function,
                file: f.file,
                line: f.line.filter(|l| *l > 0),
            })
        })
        .collect()
}

/// The tracer's side: an answer to a capture, checked against every bound
/// the helper must keep; one out of bounds is not used.
pub fn from_reply(r: Reply) -> Result<Captured, String> {
    let bad =
        |why: String| format!("the stack helper's answer was out of bounds ({why}): not used");
    match r {
        Reply::Error(e) => Err(cut(e, MAX_ERROR_TEXT)),
        Reply::Done => Err(bad("no stack in the answer to a capture".into())),
        Reply::Stack {
            frames,
            omitted,
            others,
        } => {
            let frames = frames_in(frames).map_err(bad)?;
            let others = match others {
                None => None,
                Some(ts) if ts.len() > MAX_THREADS => {
                    return Err(bad(format!("{} threads (at most {MAX_THREADS})", ts.len())));
                }
                Some(ts) => Some(
                    ts.into_iter()
                        .map(|t| {
                            Ok(PyThread {
                                tid: t.tid,
                                frames: frames_in(t.frames)?,
                                omitted: t.omitted,
                            })
                        })
                        .collect::<Result<Vec<_>, String>>()
                        .map_err(bad)?,
                ),
            };
            Ok(Captured {
                frames,
                omitted,
                others,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(name: &str) -> Frame {
        Frame {
            function: name.into(),
            file: "/srv/app.py".into(),
            line: Some(3),
        }
    }

    #[test]
    fn frames_round_trip_and_an_oversized_length_is_refused_before_reading() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"{\"a\":1}").unwrap();
        assert_eq!(read_frame(&mut buf.as_slice(), 64).unwrap(), b"{\"a\":1}");
        // A length past the bound: refused without allocating it.
        let mut huge = u32::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(b"xx");
        let e = read_frame(&mut huge.as_slice(), MAX_REPLY).unwrap_err();
        assert!(e.to_string().contains("at most"), "{e}");
        // Cut short: an error, not a partial frame.
        assert!(read_frame(&mut &buf[..6], 64).is_err());
    }

    #[test]
    fn an_answer_within_bounds_is_used_and_one_past_them_is_not() {
        let ok = Reply::Stack {
            frames: vec![frame("f"), frame("g")],
            omitted: 0,
            others: Some(vec![Thread {
                tid: Some(9),
                frames: vec![frame("h")],
                omitted: 2,
            }]),
        };
        let c = from_reply(ok).unwrap();
        assert_eq!(c.frames[0].function, "f");
        assert_eq!(c.others.unwrap()[0].omitted, 2);

        let deep = Reply::Stack {
            frames: (0..MAX_FRAMES + 1).map(|_| frame("f")).collect(),
            omitted: 0,
            others: None,
        };
        assert!(from_reply(deep).unwrap_err().contains("out of bounds"));
        let wide = Reply::Stack {
            frames: vec![],
            omitted: 0,
            others: Some(
                (0..MAX_THREADS + 1)
                    .map(|_| Thread {
                        tid: None,
                        frames: vec![],
                        omitted: 0,
                    })
                    .collect(),
            ),
        };
        assert!(from_reply(wide).unwrap_err().contains("out of bounds"));
        let long = Reply::Stack {
            frames: vec![frame(&"x".repeat(MAX_TEXT + 4))],
            omitted: 0,
            others: None,
        };
        assert!(from_reply(long).unwrap_err().contains("out of bounds"));
        let e = from_reply(Reply::Error("e".repeat(10_000))).unwrap_err();
        assert!(e.len() <= MAX_ERROR_TEXT + 3);
    }

    #[test]
    fn the_helper_cuts_names_to_their_bound() {
        let c = Captured {
            frames: vec![PyFrame {
                function: "é".repeat(MAX_TEXT),
                file: "a.py".into(),
                line: None,
            }],
            omitted: 0,
            others: None,
        };
        let Reply::Stack { frames, .. } = to_reply(Ok(c)) else {
            panic!()
        };
        assert!(frames[0].function.len() <= MAX_TEXT + 3);
        assert!(
            from_reply(to_reply(Ok(Captured {
                frames: vec![],
                omitted: 0,
                others: None
            })))
            .is_ok()
        );
    }
}
