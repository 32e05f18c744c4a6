//! `null`: discards writes and reads zeros, at no cost but the call. For measuring the layers
//! above a device.

pub mod rpc;

use crate::bdev::{Bdev, BdevError, BdevProps, Io, IoChannel, IoFuture, IoType};
use serde_json::{json, Value};
use std::rc::Rc;
use uuid::Uuid;

pub struct NullBdev {
    props: BdevProps,
}

impl NullBdev {
    pub fn new(name: &str, num_blocks: u64, block_size: u32, uuid: Option<Uuid>) -> Result<NullBdev, String> {
        if !block_size.is_power_of_two() || !(512..=65536).contains(&block_size) {
            return Err(format!("block_size {block_size} must be a power of two from 512 to 65536"));
        }
        if num_blocks == 0 || num_blocks.checked_mul(block_size as u64).is_none() {
            return Err("num_blocks must be at least 1 and num_blocks * block_size must fit in 64 bits".into());
        }
        Ok(NullBdev { props: BdevProps::new(name, "Null disk", block_size, num_blocks, uuid.unwrap_or_else(Uuid::new_v4)) })
    }
}

struct NullChannel;

impl IoChannel for NullChannel {
    fn submit<'a, 'b: 'a>(&'a self, io: Io<'a, 'b>) -> IoFuture<'a> {
        if let Io::Read { bufs, .. } = io {
            // Zeros rather than whatever the buffer held: it may hold another host's data.
            bufs.iter_mut().for_each(|b| b.fill(0));
        }
        IoFuture::ready(Ok(()))
    }
}

impl Bdev for NullBdev {
    fn props(&self) -> &BdevProps {
        &self.props
    }
    fn supports(&self, _io: IoType) -> bool {
        true
    }
    fn open_channel(&self) -> Result<Rc<dyn IoChannel>, BdevError> {
        Ok(Rc::new(NullChannel))
    }
    fn config_call(&self) -> Option<(&'static str, Value)> {
        Some((
            "bdev_null_create",
            json!({ "name": self.name(), "num_blocks": self.num_blocks(), "block_size": self.block_size(), "uuid": self.uuid().to_string() }),
        ))
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
