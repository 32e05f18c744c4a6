//! The driver's configuration (a TOML file; a ConfigMap in a deployment): the tidemark nodes it
//! manages and the defaults of the volumes it creates.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The lvol store volumes are created in when the StorageClass names none.
    #[serde(default = "default_pool")]
    pub default_pool: String,
    #[serde(default)]
    pub nodes: Vec<Node>,
}

/// One tidemarkd.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// Part of every volume and snapshot id, so it must stay the same for the node's life.
    pub name: String,
    /// The JSON-RPC endpoint: a Unix socket path, or `host:port` for TCP.
    pub rpc: String,
    /// Where hosts connect for NVMe/TCP (a listener the driver adds to each volume's subsystem).
    pub nvmf_address: String,
    /// The address hosts are told to connect to (the publish context's `traddr`) when it is
    /// not `nvmf_address`: a NAT or port forward in front of the node, or a listener on a
    /// wildcard address. Default: `nvmf_address`.
    #[serde(default)]
    pub nvmf_host_address: Option<String>,
    #[serde(default = "default_nvmf_port")]
    pub nvmf_port: u16,
    /// The node's topology segments (e.g. `"topology.tidemark.io/node" = "a"`).
    #[serde(default)]
    pub topology: BTreeMap<String, String>,
}

fn default_pool() -> String {
    "pool".into()
}

fn default_nvmf_port() -> u16 {
    4420
}

impl Node {
    /// Where hosts connect: `nvmf_host_address`, else `nvmf_address`.
    pub fn host_address(&self) -> &str {
        self.nvmf_host_address.as_deref().unwrap_or(&self.nvmf_address)
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let c: Config = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        c.validate().map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(c)
    }

    fn validate(&self) -> Result<(), String> {
        // Names become parts of ids of the form node/pool/lvol.
        let ok = |s: &str| !s.is_empty() && s.len() <= 63 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !ok(&self.default_pool) {
            return Err(format!("default_pool {:?}: 1 to 63 letters, digits, '-', '_' or '.'", self.default_pool));
        }
        for (i, n) in self.nodes.iter().enumerate() {
            if !ok(&n.name) {
                return Err(format!("nodes[{i}].name {:?}: 1 to 63 letters, digits, '-', '_' or '.'", n.name));
            }
            if self.nodes[..i].iter().any(|o| o.name == n.name) {
                return Err(format!("nodes[{i}].name {:?} is listed twice", n.name));
            }
        }
        Ok(())
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_with_two_nodes_parses_and_bad_names_are_refused() {
        let c: Config = toml::from_str(
            r#"
            default_pool = "fast"
            [[nodes]]
            name = "a"
            rpc = "/run/tidemark/rpc.sock"
            nvmf_address = "10.0.0.1"
            topology = { "topology.tidemark.io/node" = "a" }
            [[nodes]]
            name = "b"
            rpc = "10.0.0.2:5260"
            nvmf_address = "10.0.0.2"
            nvmf_port = 4421
            nvmf_host_address = "198.51.100.2"
            "#,
        )
        .unwrap();
        assert!(c.validate().is_ok());
        assert_eq!((c.nodes[0].nvmf_port, c.nodes[1].nvmf_port), (4420, 4421));
        assert_eq!((c.nodes[0].host_address(), c.nodes[1].host_address()), ("10.0.0.1", "198.51.100.2"));
        assert_eq!(c.node("a").unwrap().topology["topology.tidemark.io/node"], "a");
        let bad: Config = toml::from_str("[[nodes]]\nname = \"a/b\"\nrpc = \"x\"\nnvmf_address = \"y\"\n").unwrap();
        assert!(bad.validate().unwrap_err().contains("a/b"));
        assert!(toml::from_str::<Config>("[[nodes]]\nname = \"a\"\nrpc = \"x\"\nnvmf_address = \"y\"\nport = 1\n").is_err(), "unknown keys are refused");
    }
}
