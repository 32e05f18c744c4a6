//! The SCSI block command set (SPC-4 / SBC-3), independent of the transport: CDB parsing
//! ([`cdb`]), sense data ([`sense`]), INQUIRY and VPD pages ([`inquiry`]), mode pages
//! ([`mode`]), persistent reservations ([`pr`]), EXTENDED COPY ([`xcopy`]) and the logical unit that runs commands against a bdev ([`lu`]). iSCSI is its
//! only user today; anything that carries CDBs (a vhost-scsi or SRP front end) can reuse it.

pub mod cdb;
pub mod inquiry;
pub mod lu;
pub mod mode;
pub mod pr;
pub mod sense;
mod write_gate;
pub mod xcopy;

pub use cdb::{Command, DataDir, Geometry};
pub use inquiry::PortIdentity;
pub use lu::{decode_lun, encode_lun, Context, Done, Failure, LogicalUnit, Nexus, MAX_LUN};
pub use pr::ItNexus;
pub use sense::{Sense, SenseKey, Status};
