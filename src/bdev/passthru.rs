//! [`PassThru`]: the common part of a virtual bdev over one base bdev that it forwards to
//! (SPDK's `vbdev_passthru`): `delay`, `error`. It holds the claim on the base and the bdev's
//! props (its own name, product name and UUID; the base's block size and count), and answers
//! what such a bdev answers as its base does. The module keeps only its own behaviour: what
//! its channel does to an I/O before or after [`Channel::forward`] passes it on.
//!
//! ```ignore
//! pub struct MyVbdev { pt: PassThru, /* the module's own state */ }
//!
//! impl Bdev for MyVbdev {
//!     fn props(&self) -> &BdevProps { self.pt.props() }
//!     fn supports(&self, io: IoType) -> bool { self.pt.supports(io) }
//!     fn read_only(&self) -> bool { self.pt.read_only() }
//!     fn open_channel(&self) -> Result<Rc<dyn IoChannel>, BdevError> {
//!         Ok(Rc::new(MyChannel { base: self.pt.base_channel()? }))
//!     }
//!     // driver_specific, config_call (naming self.pt.base_name()), as_any ...
//! }
//! ```

use super::{BdevEntry, BdevError, BdevProps, Channel, HoldGuard, IoType};
use std::sync::Arc;
use uuid::Uuid;

pub struct PassThru {
    props: BdevProps,
    /// The claim on the base: released (the base deletable again) when the bdev is dropped.
    base: HoldGuard,
}

impl PassThru {
    /// A bdev named `name` over the base `base` claims (`uuid`: a new one if `None`).
    pub fn new(base: HoldGuard, name: impl Into<String>, product_name: &'static str, uuid: Option<Uuid>) -> PassThru {
        let props = BdevProps::over(base.entry().bdev().props(), name, product_name, uuid.unwrap_or_else(Uuid::new_v4));
        PassThru { props, base }
    }

    pub fn props(&self) -> &BdevProps {
        &self.props
    }

    pub fn base(&self) -> &Arc<BdevEntry> {
        self.base.entry()
    }

    pub fn base_name(&self) -> &str {
        self.base.entry().name()
    }

    /// The base's I/O types: what the bdev forwards it can serve.
    pub fn supports(&self, io: IoType) -> bool {
        self.base.entry().bdev().supports(io)
    }

    /// Read-only while the base is (a snapshot, an lvol set read-only): writes would fail there.
    pub fn read_only(&self) -> bool {
        self.base.entry().bdev().read_only()
    }

    /// This core's channel to the base, for the bdev's own channel to forward through.
    pub fn base_channel(&self) -> Result<Channel, BdevError> {
        Channel::get(self.base.entry())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::BdevRegistry;
    use crate::bdevs::malloc::MallocBdev;

    #[test]
    fn takes_the_base_geometry_and_its_own_identity_and_holds_the_claim() {
        let reg = BdevRegistry::new(1);
        let m = reg.register(Arc::new(MallocBdev::new("m", 64, 4096, None).unwrap())).unwrap();
        let u = Uuid::new_v4();
        let pt = PassThru::new(m.claim("top").unwrap(), "top", "delay", Some(u));
        let p = pt.props();
        assert_eq!((p.name(), p.product_name(), p.uuid()), ("top", "delay", u));
        assert_eq!((p.block_size(), p.num_blocks()), (4096, 64));
        assert_eq!(pt.base_name(), "m");
        assert!(IoType::ALL.iter().all(|t| pt.supports(*t) == m.bdev().supports(*t)));
        assert!(!pt.read_only());
        assert!(m.claim("other").is_err(), "the base stays claimed while the pass-through lives");
        drop(pt);
        assert!(m.claim("other").is_ok(), "dropping the pass-through releases the claim");
    }
}
