//! Typed RPC parameters: every method deserializes its params into a struct that denies
//! unknown fields, and a bad field is named in the -32602 message.

use super::RpcError;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Deserializes `params` (absent = `{}`) into `T`, naming the offending field on error.
pub fn parse<T: DeserializeOwned>(params: Option<Value>) -> Result<T, RpcError> {
    let v = match params {
        None | Some(Value::Null) => Value::Object(Default::default()),
        Some(v @ Value::Object(_)) => v,
        Some(_) => return Err(RpcError::invalid_params("params must be a JSON object")),
    };
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path.is_empty() || path == "." {
            RpcError::invalid_params(inner)
        } else {
            RpcError::invalid_params(format!("field `{path}`: {inner}"))
        }
    })
}

/// Parameters of an SPDK method, as SPDK's clients send them: the struct has every field SPDK
/// defines (with SPDK's defaults), and `limits` lists the fields whose value tidemark does not
/// support in every case. [`parse_spdk`] refuses such a value with -32602 naming the field and
/// why, so an SPDK script runs unchanged as long as it asks for nothing tidemark lacks.
pub trait SpdkParams: DeserializeOwned {
    /// `(field, supported, why)` for each field with values tidemark refuses.
    fn limits(&self) -> Vec<(&'static str, bool, &'static str)> {
        Vec::new()
    }
}

/// [`parse`], then the first limit the call exceeds becomes -32602 naming the field.
pub fn parse_spdk<T: SpdkParams>(params: Option<Value>) -> Result<T, RpcError> {
    let t: T = parse(params)?;
    match t.limits().into_iter().find(|(_, ok, _)| !ok) {
        Some((field, _, why)) => Err(RpcError::invalid_params(format!("field `{field}`: {why}"))),
        None => Ok(t),
    }
}

/// A required parameter that must be non-empty.
pub fn non_empty<'a>(field: &str, v: &'a str) -> Result<&'a str, RpcError> {
    if v.is_empty() {
        return Err(RpcError::invalid_params(format!("field `{field}` must not be empty")));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct P {
        name: String,
        num_blocks: u64,
    }

    #[test]
    fn names_the_bad_field() {
        let e = parse::<P>(Some(json!({"name": "a", "num_blocks": "x"}))).unwrap_err();
        assert_eq!(e.code, -32602);
        assert!(e.message.contains("num_blocks"), "{}", e.message);
        let e = parse::<P>(Some(json!({"name": "a"}))).unwrap_err();
        assert!(e.message.contains("num_blocks"), "{}", e.message);
        let e = parse::<P>(Some(json!({"name": "a", "num_blocks": 1, "bogus": 1}))).unwrap_err();
        assert!(e.message.contains("bogus"), "{}", e.message);
        let e = parse::<P>(Some(json!([1]))).unwrap_err();
        assert_eq!(e.code, -32602);
    }

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Q {
        #[serde(default)]
        md_size: u32,
    }

    impl SpdkParams for Q {
        fn limits(&self) -> Vec<(&'static str, bool, &'static str)> {
            vec![("md_size", self.md_size == 0, "metadata is not supported")]
        }
    }

    #[test]
    fn limits_name_the_field_and_why() {
        assert!(parse_spdk::<Q>(Some(json!({"md_size": 0}))).is_ok());
        assert!(parse_spdk::<Q>(None).is_ok());
        let e = parse_spdk::<Q>(Some(json!({"md_size": 8}))).unwrap_err();
        assert_eq!(e.code, -32602);
        assert!(e.message.contains("`md_size`: metadata is not supported"), "{}", e.message);
        let e = parse_spdk::<Q>(Some(json!({"md_sz": 8}))).unwrap_err();
        assert!(e.message.contains("md_sz"), "{}", e.message);
    }
}
