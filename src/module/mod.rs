//! Modules: how a subsystem (bdev, nvmf, iscsi, backup, ...) or a bdev module (malloc, uring,
//! mirror, ...) joins the target without anyone keeping a list of them.
//!
//! Each module declares itself once, beside its code, with [`register_module!`](crate::register_module):
//! its name, its place in the startup and shutdown order, an optional constructor for its
//! running state (a [`Module`]: configuration, metrics, shutdown hook) and its RPC methods.
//! The declarations are gathered at link time (the `linkme` crate, as SPDK's
//! `SPDK_BDEV_MODULE_REGISTER` gathers them through constructor functions), so adding a module
//! is adding a folder: no list elsewhere names it (docs/how-to-add-a-module.md).
//!
//! Modules receive a [`Ctx`], the narrow view of the target they may use: reactors, bdev
//! registry, data directory, configuration, start time, the shutdown request and the other
//! modules by type. `Ctx` lives below every module, so no module imports the composition root
//! ([`crate::target`]) and the crate's import graph has no cycle between subsystems
//! (tests/architecture.rs).

mod ctx;
pub mod framework;
pub mod metrics;
pub mod reference;

pub use ctx::Ctx;

#[doc(hidden)]
pub use linkme;

use crate::config::{Config, ConfigCall};
use crate::metrics::MetricsOut;
use crate::reactor::ReactorHandle;
use crate::rpc::RpcError;
use serde_json::Value;
use std::any::Any;
use std::collections::BTreeMap;
use std::sync::Arc;

/// An RPC handler: runs on an RPC thread with the caller's params.
pub type Handler = fn(&Ctx, Option<Value>) -> Result<Value, RpcError>;

/// Builds a module's running state when the target starts.
pub type Construct = fn(&ReactorHandle, &Config) -> Arc<dyn Module>;

/// The running state of a module with its own configuration, shutdown or metrics (SPDK's
/// subsystems: bdev, nvmf, iscsi, ...).
pub trait Module: Send + Sync + 'static {
    /// The module's name in configurations and `framework_get_subsystems` ("bdev", "nvmf").
    /// Equals the name it was declared with.
    fn name(&self) -> &'static str;
    /// The RPC calls that recreate the module's current state, in order (`save_config`).
    fn config(&self, ctx: &Ctx) -> Vec<ConfigCall>;
    /// Stops serving hosts (listeners, connections); called at shutdown before bdevs close,
    /// modules in reverse order.
    fn shutdown(&self, _ctx: &Ctx) {}
    /// Writes the module's metric families.
    fn metrics(&self, _ctx: &Ctx, _out: &mut MetricsOut<'_>) -> std::fmt::Result {
        Ok(())
    }
    /// Bdev `name` changed size (a volume grown while exported): an export tells its hosts.
    /// Runs on the thread that resized; must not block.
    fn bdev_resized(&self, _name: &str) {}
    fn as_any(&self) -> &dyn Any;
}

/// One RPC method a module serves. Fields are added here, so declarations go through
/// [`register_module!`](crate::register_module), never struct literals of their own.
#[derive(Debug)]
pub struct MethodDecl {
    pub name: &'static str,
    pub handler: Handler,
    /// The name of the module that serves it.
    pub module: &'static str,
    /// One line for `rpc_get_methods`' readers and the RPC reference.
    pub summary: &'static str,
    /// The JSON Schema of the params type the handler parses, derived from it
    /// (`#[derive(JsonSchema)]`): docs/rpc.md, `tidemark METHOD --help` and
    /// `rpc_get_methods {"detailed": true}` are made from it.
    pub params: fn() -> schemars::Schema,
    /// The errors the handler answers beyond a bad params object (-32602, implied for every
    /// method with params, and the reactor failures any method may meet): each set is a list
    /// of `(code, when)`, sets shared by several methods (a module's [`ErrorDoc`] constants)
    /// before the method's own. docs/rpc.md, `tidemark METHOD --help` and
    /// `rpc_get_methods {"detailed": true}` print them; tests/rpc_reference.rs calls each method
    /// with params that must fail and checks the answer is one of them.
    pub errors: &'static [&'static [ErrorDoc]],
}

/// One error a method answers: the JSON-RPC code (a constant of [`crate::rpc`]) and when, in a
/// few words ("the bdev does not exist").
pub type ErrorDoc = (i32, &'static str);

/// A module as it declares itself.
#[derive(Debug)]
pub struct ModuleDecl {
    pub name: &'static str,
    /// Startup order, ascending; shutdown runs backwards (front ends stop before the bdevs
    /// they serve). Also the order of `save_config`'s sections and of `/metrics`.
    pub order: i32,
    /// Whether the module is part of this run (test-only modules check an environment
    /// variable); a disabled module has no state and no methods.
    pub enabled: fn() -> bool,
    pub construct: Option<Construct>,
    pub methods: &'static [MethodDecl],
}

/// Every module linked into the program.
#[linkme::distributed_slice]
pub static MODULES: [ModuleDecl];

/// The default of [`ModuleDecl::enabled`].
pub fn always() -> bool {
    true
}

/// Declares a module (see the module documentation and docs/how-to-add-a-module.md):
///
/// ```ignore
/// tidemark::register_module! {
///     name: "malloc",
///     order: 110,
///     methods: [
///         ("bdev_malloc_create", create, Create, "Creates a bdev in memory.", [&[(EEXIST, "a bdev of that name exists")]]),
///         ("bdev_malloc_delete", delete, ByName, "Deletes a bdev made by bdev_malloc_create.", [DELETE_ERRORS]),
///     ],
/// }
/// ```
///
/// Each method is `(name, handler, params type, summary, [errors])`: the params type is the
/// struct the handler parses its params into, deriving `schemars::JsonSchema` beside
/// `Deserialize`, so its fields, types, defaults and doc comments document the method
/// (docs/rpc.md). A method without one does not compile. The errors are a list of
/// `&[(code, "when")]` sets ([`ErrorDoc`]; the codes of [`crate::rpc`] are in scope): a set
/// several methods share is a constant named here, a method's own written inline; `[]` for a method that fails only on bad params. Read
/// the handler for them: tests/rpc_reference.rs fails when a call answers a code its method
/// does not declare.
///
/// Optional, between `order` and `methods`: `enabled: fn() -> bool` and
/// `construct: fn(&ReactorHandle, &Config) -> Arc<dyn Module>`.
#[macro_export]
macro_rules! register_module {
    (
        name: $name:literal,
        order: $order:expr,
        $(enabled: $enabled:expr,)?
        $(construct: $construct:expr,)?
        methods: [ $( ( $method:literal, $handler:expr, $params:ty, $summary:literal, [ $( $errors:expr ),* $(,)? ] $(,)? ) ),* $(,)? ] $(,)?
    ) => {
        const _: () = {
            // The codes, for the error lists.
            #[allow(unused_imports)]
            use $crate::rpc::{EACCES, EALREADY, EBUSY, EEXIST, EINVAL, EIO, ENODEV, ENOENT, ENOSPC, EPERM, ETIMEDOUT, INTERNAL_ERROR, INVALID_PARAMS};
            #[$crate::module::linkme::distributed_slice($crate::module::MODULES)]
            #[linkme(crate = $crate::module::linkme)]
            static DECL: $crate::module::ModuleDecl = $crate::module::ModuleDecl {
                name: $name,
                order: $order,
                enabled: $crate::__module_or!($($enabled)?; $crate::module::always),
                construct: $crate::__module_or!($(Some($construct))?; None),
                methods: &[ $( $crate::module::MethodDecl {
                    name: $method,
                    handler: $handler,
                    module: $name,
                    summary: $summary,
                    params: $crate::module::reference::schema_of::<$params>,
                    errors: &[ $( $errors ),* ],
                } ),* ],
            };
        };
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __module_or {
    (; $default:expr) => {
        $default
    };
    ($given:expr; $default:expr) => {
        $given
    };
}

/// The enabled modules of the program, in order; panics naming both when two share a name.
pub fn declared() -> Vec<&'static ModuleDecl> {
    in_order(MODULES.iter().filter(|d| (d.enabled)()).collect())
}

/// `v` in startup order; panics when two modules share a name.
fn in_order(mut v: Vec<&'static ModuleDecl>) -> Vec<&'static ModuleDecl> {
    // Equal orders are broken by name, so every run (and every link order) agrees.
    v.sort_by(|a, b| a.order.cmp(&b.order).then(a.name.cmp(b.name)));
    let mut names: Vec<&str> = v.iter().map(|d| d.name).collect();
    names.sort_unstable();
    // Each module once: twice would write its metric families twice (Prometheus then rejects
    // the whole scrape) and run its shutdown twice.
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        panic!("module {} is registered twice: {names:?}", w[0]);
    }
    v
}

/// The method table of `modules`; panics naming both modules when a method is registered twice.
pub fn method_table(modules: &[&'static ModuleDecl]) -> BTreeMap<&'static str, &'static MethodDecl> {
    let mut map: BTreeMap<&'static str, &'static MethodDecl> = BTreeMap::new();
    for m in modules.iter().flat_map(|d| d.methods.iter()) {
        if let Some(old) = map.insert(m.name, m) {
            panic!("RPC method {} registered twice: by module {} and by module {}", m.name, old.module, m.module);
        }
    }
    map
}

/// Whether `name` is an RPC method of an enabled module (before any target exists: the SPDK
/// JSON configuration loader skips the methods tidemark does without).
pub fn is_method(name: &str) -> bool {
    MODULES.iter().filter(|d| (d.enabled)()).any(|d| d.methods.iter().any(|m| m.name == name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(_: &Ctx, _: Option<Value>) -> Result<Value, RpcError> {
        Ok(Value::Null)
    }

    static A: ModuleDecl = ModuleDecl {
        name: "a",
        order: 1,
        enabled: always,
        construct: None,
        methods: &[MethodDecl { name: "m", handler: ok, module: "a", summary: "", params: reference::schema_of::<()>, errors: &[] }],
    };
    static B: ModuleDecl = ModuleDecl {
        name: "b",
        order: 2,
        enabled: always,
        construct: None,
        methods: &[MethodDecl { name: "m", handler: ok, module: "b", summary: "", params: reference::schema_of::<()>, errors: &[] }],
    };

    #[test]
    #[should_panic(expected = "RPC method m registered twice: by module a and by module b")]
    fn a_method_registered_twice_names_both_modules() {
        method_table(&[&A, &B]);
    }

    static A2: ModuleDecl = ModuleDecl { name: "a", order: 3, enabled: always, construct: None, methods: &[] };

    #[test]
    #[should_panic(expected = "module a is registered twice")]
    fn two_modules_of_one_name_panic() {
        in_order(vec![&A, &B, &A2]);
    }

    #[test]
    fn the_linked_modules_have_distinct_names_and_methods() {
        let d = declared();
        let t = method_table(&d);
        for m in ["rpc_get_methods", "bdev_get_bdevs", "bdev_malloc_create", "nvmf_create_subsystem", "iscsi_create_target_node", "bdev_snapshot_create"] {
            assert!(t.contains_key(m), "{m} is not registered");
        }
        assert!(d.windows(2).all(|w| w[0].order <= w[1].order), "modules are not in order");
    }

    #[test]
    fn every_declared_error_is_a_named_code_with_a_reason() {
        for m in method_table(&declared()).values() {
            for &(code, when) in m.errors.iter().flat_map(|s| s.iter()) {
                assert!(crate::rpc::code_name(code).is_some(), "{}: error code {code} is none of crate::rpc's constants", m.name);
                assert!(!when.trim().is_empty() && !when.ends_with('.'), "{}: error {code} needs a short reason without a final period: {when:?}", m.name);
                assert!(
                    ![crate::rpc::PARSE_ERROR, crate::rpc::INVALID_REQUEST, crate::rpc::METHOD_NOT_FOUND].contains(&code),
                    "{}: {code} is the server's, not a method's",
                    m.name
                );
            }
        }
    }
}
