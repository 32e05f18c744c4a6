//! Operational parameter negotiation (RFC 7143 §13): every key with its default, range and
//! result function, and the session parameters that come out of a login.

/// The values a session runs with after login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionParams {
    pub header_digest: bool,
    pub data_digest: bool,
    /// Largest data segment the target accepts (what it declared).
    pub max_recv_dsl: u32,
    /// Largest data segment the target may send (what the initiator declared).
    pub max_send_dsl: u32,
    pub first_burst: u32,
    pub max_burst: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    pub max_outstanding_r2t: u32,
    pub max_connections: u32,
    pub time2wait: u32,
    pub time2retain: u32,
}

/// RFC 7143 defaults: what a session uses for every key nobody negotiated.
impl Default for SessionParams {
    fn default() -> Self {
        SessionParams {
            header_digest: false,
            data_digest: false,
            max_recv_dsl: 8192,
            max_send_dsl: 8192,
            first_burst: 65536,
            max_burst: 262144,
            immediate_data: true,
            initial_r2t: true,
            max_outstanding_r2t: 1,
            max_connections: 1,
            time2wait: 2,
            time2retain: 20,
        }
    }
}

/// What the target offers (from `iscsi_set_options` and the target node).
#[derive(Debug, Clone)]
pub struct TargetLimits {
    pub max_recv_dsl: u32,
    pub first_burst: u32,
    pub max_burst: u32,
    pub immediate_data: bool,
    pub max_outstanding_r2t: u32,
    pub time2wait: u32,
    pub time2retain: u32,
    /// The target node insists on CRC32C digests.
    pub require_header_digest: bool,
    pub require_data_digest: bool,
}

pub const MIN_DSL: u32 = 512;
pub const MAX_DSL: u32 = (1 << 24) - 1;

/// Why a negotiation cannot continue (the login fails with an initiator error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NegotiationError {
    #[error("the initiator offers no acceptable value for {0}")]
    NoCommonValue(&'static str),
}

/// Negotiation state across the PDUs of one login.
#[derive(Debug, Clone)]
pub struct Negotiation {
    pub params: SessionParams,
    pub declared_mrdsl: bool,
    pub discovery: bool,
    /// Keys answered so far (an initiator may not renegotiate a key within a login).
    answered: Vec<String>,
}

fn parse_num(v: &str) -> Option<u64> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else {
        v.parse().ok()
    }
}

fn bool_value(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "Yes"
    } else {
        "No"
    }
}

impl Negotiation {
    pub fn new(discovery: bool) -> Self {
        Negotiation { params: SessionParams::default(), declared_mrdsl: false, discovery, answered: Vec::new() }
    }

    /// Whether `key` is an operational key this module handles.
    pub fn handles(key: &str) -> bool {
        matches!(
            key,
            "HeaderDigest"
                | "DataDigest"
                | "MaxRecvDataSegmentLength"
                | "MaxBurstLength"
                | "FirstBurstLength"
                | "ImmediateData"
                | "InitialR2T"
                | "MaxOutstandingR2T"
                | "MaxConnections"
                | "DefaultTime2Wait"
                | "DefaultTime2Retain"
                | "ErrorRecoveryLevel"
                | "DataPDUInOrder"
                | "DataSequenceInOrder"
                | "IFMarker"
                | "OFMarker"
                | "IFMarkInt"
                | "OFMarkInt"
                | "TaskReporting"
                | "iSCSIProtocolLevel"
        )
    }

    /// Answers one offered operational key; appends the answer to `out` (possibly nothing for
    /// a declaration that needs no answer).
    pub fn offer(&mut self, key: &str, value: &str, limits: &TargetLimits, out: &mut Vec<(String, String)>) -> Result<(), NegotiationError> {
        let p = &mut self.params;
        let mut answer = |v: String| out.push((key.to_string(), v));
        let numeric = |lo: u64, hi: u64| parse_num(value).filter(|n| (lo..=hi).contains(n));
        match key {
            "HeaderDigest" | "DataDigest" => {
                let header = key == "HeaderDigest";
                let require = if header { limits.require_header_digest } else { limits.require_data_digest };
                let choice = value.split(',').map(str::trim).find(|v| *v == "CRC32C" || (*v == "None" && !require));
                match choice {
                    Some(c) => {
                        let on = c == "CRC32C";
                        if header {
                            p.header_digest = on;
                        } else {
                            p.data_digest = on;
                        }
                        answer(c.to_string());
                    }
                    None => {
                        answer("Reject".into());
                        return Err(NegotiationError::NoCommonValue(if header { "HeaderDigest" } else { "DataDigest" }));
                    }
                }
            }
            "MaxRecvDataSegmentLength" => match numeric(MIN_DSL as u64, MAX_DSL as u64) {
                // Declarative: the initiator's receive limit is our send limit. No answer.
                Some(n) => p.max_send_dsl = n as u32,
                None => answer("Reject".into()),
            },
            "MaxBurstLength" | "FirstBurstLength" if self.discovery => answer("Irrelevant".into()),
            "MaxBurstLength" => match numeric(MIN_DSL as u64, MAX_DSL as u64) {
                Some(n) => {
                    p.max_burst = (n as u32).min(limits.max_burst);
                    answer(p.max_burst.to_string());
                }
                None => answer("Reject".into()),
            },
            "FirstBurstLength" => match numeric(MIN_DSL as u64, MAX_DSL as u64) {
                Some(n) => {
                    p.first_burst = (n as u32).min(limits.first_burst);
                    answer(p.first_burst.to_string());
                }
                None => answer("Reject".into()),
            },
            "ImmediateData" | "InitialR2T" | "DataPDUInOrder" | "DataSequenceInOrder" if self.discovery => answer("Irrelevant".into()),
            "ImmediateData" => match bool_value(value) {
                Some(b) => {
                    p.immediate_data = b && limits.immediate_data;
                    answer(yes_no(p.immediate_data).into());
                }
                None => answer("Reject".into()),
            },
            "InitialR2T" => match bool_value(value) {
                // OR function; this target is happy with unsolicited data.
                Some(b) => {
                    p.initial_r2t = b;
                    answer(yes_no(b).into());
                }
                None => answer("Reject".into()),
            },
            "DataPDUInOrder" | "DataSequenceInOrder" => match bool_value(value) {
                // OR function with the target's Yes: data always arrives in order.
                Some(_) => answer("Yes".into()),
                None => answer("Reject".into()),
            },
            "MaxOutstandingR2T" | "MaxConnections" if self.discovery => answer("Irrelevant".into()),
            "MaxOutstandingR2T" => match numeric(1, 65535) {
                Some(n) => {
                    p.max_outstanding_r2t = (n as u32).min(limits.max_outstanding_r2t);
                    answer(p.max_outstanding_r2t.to_string());
                }
                None => answer("Reject".into()),
            },
            "MaxConnections" => match numeric(1, 65535) {
                // One connection per session: see the module docs of `conn`.
                Some(_) => {
                    p.max_connections = 1;
                    answer("1".into());
                }
                None => answer("Reject".into()),
            },
            "DefaultTime2Wait" => match numeric(0, 3600) {
                Some(n) => {
                    p.time2wait = (n as u32).max(limits.time2wait);
                    answer(p.time2wait.to_string());
                }
                None => answer("Reject".into()),
            },
            "DefaultTime2Retain" => match numeric(0, 3600) {
                Some(n) => {
                    p.time2retain = (n as u32).min(limits.time2retain);
                    answer(p.time2retain.to_string());
                }
                None => answer("Reject".into()),
            },
            "ErrorRecoveryLevel" => match numeric(0, 2) {
                Some(_) => answer("0".into()),
                None => answer("Reject".into()),
            },
            "IFMarker" | "OFMarker" => answer("No".into()),
            "IFMarkInt" | "OFMarkInt" => answer("Irrelevant".into()),
            "TaskReporting" => answer("RFC3720".into()),
            "iSCSIProtocolLevel" => match numeric(0, 31) {
                Some(n) => answer(n.min(1).to_string()),
                None => answer("Reject".into()),
            },
            _ => answer("NotUnderstood".into()),
        }
        self.answered.push(key.to_string());
        Ok(())
    }

    /// The target's own declarations, sent once in the operational stage.
    pub fn declarations(&mut self, limits: &TargetLimits, out: &mut Vec<(String, String)>) {
        if !self.declared_mrdsl {
            self.declared_mrdsl = true;
            self.params.max_recv_dsl = limits.max_recv_dsl;
            out.push(("MaxRecvDataSegmentLength".into(), limits.max_recv_dsl.to_string()));
        }
    }

    /// Final adjustments when the login completes.
    pub fn finish(&mut self) {
        // FirstBurstLength never exceeds MaxBurstLength (RFC 7143 §13.14).
        if self.params.first_burst > self.params.max_burst {
            self.params.first_burst = self.params.max_burst;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> TargetLimits {
        TargetLimits {
            max_recv_dsl: 262144,
            first_burst: 65536,
            max_burst: 1 << 20,
            immediate_data: true,
            max_outstanding_r2t: 16,
            time2wait: 2,
            time2retain: 20,
            require_header_digest: false,
            require_data_digest: false,
        }
    }

    fn run(keys: &[(&str, &str)]) -> (Negotiation, Vec<(String, String)>) {
        let mut n = Negotiation::new(false);
        let mut out = Vec::new();
        for (k, v) in keys {
            n.offer(k, v, &limits(), &mut out).unwrap();
        }
        n.declarations(&limits(), &mut out);
        n.finish();
        (n, out)
    }

    #[test]
    fn results_follow_each_keys_function() {
        let (n, out) = run(&[
            ("HeaderDigest", "CRC32C,None"),
            ("DataDigest", "None"),
            ("MaxRecvDataSegmentLength", "65536"),
            ("MaxBurstLength", "16776192"),
            ("FirstBurstLength", "262144"),
            ("ImmediateData", "Yes"),
            ("InitialR2T", "No"),
            ("MaxOutstandingR2T", "1"),
            ("MaxConnections", "8"),
            ("DefaultTime2Wait", "0"),
            ("DefaultTime2Retain", "60"),
            ("ErrorRecoveryLevel", "2"),
            ("X-com.example.Foo", "bar"),
        ]);
        let p = &n.params;
        assert!(p.header_digest && !p.data_digest);
        assert_eq!(p.max_send_dsl, 65536);
        assert_eq!(p.max_recv_dsl, 262144);
        assert_eq!(p.max_burst, 1 << 20);
        assert_eq!(p.first_burst, 65536);
        assert!(!p.initial_r2t);
        assert_eq!(p.max_connections, 1);
        assert_eq!((p.time2wait, p.time2retain), (2, 20));
        let get = |k: &str| out.iter().find(|(x, _)| x == k).map(|(_, v)| v.as_str());
        assert_eq!(get("ErrorRecoveryLevel"), Some("0"));
        assert_eq!(get("X-com.example.Foo"), Some("NotUnderstood"));
        assert_eq!(get("MaxRecvDataSegmentLength"), Some("262144"));
        assert_eq!(out.iter().filter(|(k, _)| k == "MaxRecvDataSegmentLength").count(), 1, "declared once, not answered");
    }

    #[test]
    fn out_of_range_values_are_rejected_and_required_digests_enforced() {
        let mut n = Negotiation::new(false);
        let mut out = Vec::new();
        n.offer("MaxRecvDataSegmentLength", "100", &limits(), &mut out).unwrap();
        n.offer("MaxBurstLength", "99999999999", &limits(), &mut out).unwrap();
        assert!(out.iter().all(|(_, v)| v == "Reject"));
        assert_eq!(n.params.max_send_dsl, 8192, "the default stays");
        let mut l = limits();
        l.require_data_digest = true;
        assert!(n.offer("DataDigest", "None", &l, &mut out).is_err());
        assert!(n.offer("DataDigest", "None,CRC32C", &l, &mut out).is_ok());
        assert!(n.params.data_digest);
    }
}
