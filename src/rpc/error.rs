//! JSON-RPC errors: the one place where module errors become JSON-RPC codes.

use crate::bdev::CreateError;
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
pub const ETIMEDOUT: i32 = -110;
pub const EALREADY: i32 = -114;

#[derive(Debug, Clone, PartialEq)]
pub struct RpcError {
    pub code: i32,
    pub message: String,
}

impl RpcError {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        RpcError { code, message: message.into() }
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

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (code {})", self.message, self.code)
    }
}

impl std::error::Error for RpcError {}

impl From<CreateError> for RpcError {
    fn from(e: CreateError) -> Self {
        let code = match &e {
            CreateError::Exists(_) => EEXIST,
            CreateError::NotFound(_) => ENODEV,
            CreateError::Busy { .. } => EBUSY,
            CreateError::Invalid(_) => INVALID_PARAMS,
            CreateError::Io(_) => EIO,
        };
        let message = match &e {
            CreateError::Invalid(m) => format!("Invalid parameters: {m}"),
            other => other.to_string(),
        };
        RpcError::new(code, message)
    }
}

impl From<crate::reactor::CallError> for RpcError {
    fn from(e: crate::reactor::CallError) -> Self {
        RpcError::new(ETIMEDOUT, e.to_string())
    }
}
