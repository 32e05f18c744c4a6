//! JSON-RPC errors: the one place where module errors become JSON-RPC codes.

use serde_json::{json, Value};

pub const PARSE_ERROR: i32 = -32700;
pub const INVALID_REQUEST: i32 = -32600;
pub const METHOD_NOT_FOUND: i32 = -32601;
pub const INVALID_PARAMS: i32 = -32602;
pub const INTERNAL_ERROR: i32 = -32603;
// SPDK answers with negative errno values for state errors; so do we.
pub const EIO: i32 = -5;
pub const ENOMEM: i32 = -12;
pub const EBUSY: i32 = -16;
pub const EEXIST: i32 = -17;
pub const ENODEV: i32 = -19;
pub const EINVAL: i32 = -22;
pub const ENOSPC: i32 = -28;
pub const EPERM: i32 = -1;
/// A key file that does not exist (`keyring_file_add_key` answers the open's errno, as SPDK).
pub const ENOENT: i32 = -2;
/// A key file the daemon may not open.
pub const EACCES: i32 = -13;
pub const ETIMEDOUT: i32 = -110;
pub const EALREADY: i32 = -114;

/// The name of a code, for the RPC reference: `EPERM`, `INVALID_PARAMS`, ...; `None` for a
/// code without a constant here.
pub fn code_name(code: i32) -> Option<&'static str> {
    Some(match code {
        PARSE_ERROR => "PARSE_ERROR",
        INVALID_REQUEST => "INVALID_REQUEST",
        METHOD_NOT_FOUND => "METHOD_NOT_FOUND",
        INVALID_PARAMS => "INVALID_PARAMS",
        INTERNAL_ERROR => "INTERNAL_ERROR",
        EPERM => "EPERM",
        ENOENT => "ENOENT",
        EIO => "EIO",
        ENOMEM => "ENOMEM",
        EACCES => "EACCES",
        EBUSY => "EBUSY",
        EEXIST => "EEXIST",
        ENODEV => "ENODEV",
        EINVAL => "EINVAL",
        ENOSPC => "ENOSPC",
        ETIMEDOUT => "ETIMEDOUT",
        EALREADY => "EALREADY",
        _ => return None,
    })
}

/// Longest error message sent to a client. Messages quote names and values the caller sent
/// (a bdev name, a field's value); bounding them here, where every error is made, means no
/// handler can echo a multi-megabyte input back, whatever it formats.
pub const MAX_MESSAGE_BYTES: usize = 1024;

#[derive(Debug, Clone, PartialEq)]
pub struct RpcError {
    pub code: i32,
    pub message: String,
}

impl RpcError {
    /// An error with `message` cut to [`MAX_MESSAGE_BYTES`] (see [`bounded`]).
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        RpcError { code, message: bounded(message.into()) }
    }

    pub fn invalid_params(message: impl std::fmt::Display) -> Self {
        RpcError::new(INVALID_PARAMS, format!("Invalid parameters: {message}"))
    }

    pub fn internal(message: impl std::fmt::Display) -> Self {
        RpcError::new(INTERNAL_ERROR, format!("Internal error: {message}"))
    }

    pub fn no_device(message: impl Into<String>) -> Self {
        RpcError::new(ENODEV, message)
    }

    pub fn busy(message: impl Into<String>) -> Self {
        RpcError::new(EBUSY, message)
    }

    pub fn exists(message: impl Into<String>) -> Self {
        RpcError::new(EEXIST, message)
    }

    pub fn to_json(&self) -> Value {
        json!({ "code": self.code, "message": self.message })
    }
}

/// `m` if it fits in [`MAX_MESSAGE_BYTES`]; else its head and tail around a note of how much
/// was left out. Both ends are kept because a quoted input usually sits between the message's
/// subject ("bdev ") and its verdict (" does not exist").
pub fn bounded(m: String) -> String {
    if m.len() <= MAX_MESSAGE_BYTES {
        return m;
    }
    let (head_len, tail_len) = (MAX_MESSAGE_BYTES / 2, MAX_MESSAGE_BYTES / 4);
    let mut h = head_len;
    while !m.is_char_boundary(h) {
        h -= 1;
    }
    let mut t = m.len() - tail_len;
    while !m.is_char_boundary(t) {
        t += 1;
    }
    let out = format!("{}...[{} bytes left out]...{}", &m[..h], t - h, &m[t..]);
    debug_assert!(out.len() <= MAX_MESSAGE_BYTES);
    out
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (code {})", self.message, self.code)
    }
}

impl std::error::Error for RpcError {}

impl From<crate::reactor::CallError> for RpcError {
    fn from(e: crate::reactor::CallError) -> Self {
        RpcError::new(ETIMEDOUT, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_keep_both_ends_and_stay_bounded() {
        let e = RpcError::new(ENODEV, format!("bdev {} does not exist", "é".repeat(1 << 20)));
        assert!(e.message.len() <= MAX_MESSAGE_BYTES, "{}", e.message.len());
        assert!(e.message.starts_with("bdev é") && e.message.ends_with("é does not exist"), "{}", e.message);
        assert!(e.message.contains("bytes left out"), "{}", e.message);
        assert_eq!(RpcError::new(EIO, "short").message, "short");
        let exact = "x".repeat(MAX_MESSAGE_BYTES);
        assert_eq!(RpcError::new(EIO, exact.clone()).message, exact);
    }
}
