//! Palisade's policy layer: inventory and hierarchical, identity-based rules as
//! YAML files, compiled into per-vNIC chains.
//!
//! - [`model`]: the typed model (inventory, groups, services, profiles, rules).
//! - [`source`] and [`mod@load`]: files from a directory or memory, parsed with
//!   positions ([`yaml`]) into the model; every problem becomes a
//!   [`diag::Diagnostic`] with file, line, column and hint ([`validate`] does
//!   the cross-reference checks).
//! - [`eval`]: the reference evaluator (DESIGN.md's semantics) and `explain`.
//! - [`compile`]: per-vNIC egress/ingress chains with provenance, incremental
//!   on retagging.
//! - [`analyze`]: shadowed, redundant, conflicting and unused rules.
//! - [`limits`] and [`chars`]: what a policy file may be: its size, how
//!   deep it nests, what its aliases copy, which characters it and its
//!   names hold; and how input is escaped when it is shown.
//!
//! The crate is pure: its only I/O is reading policy files in
//! [`source::DirSource`]. The file format is documented in the crate README
//! (`crates/policy/README.md`), and `examples/three-tier/` is a complete example.
//!
//! ```
//! use palisade_policy::{load::load, source::MemorySource, compile::Compiler, eval::{Flow, evaluate}};
//! let src = MemorySource::new().with("p.yaml", r#"
//! datacenter: { name: dc1, default: deny }
//! zones: [{ name: web, vlan: 100 }]
//! vms:
//!   - name: web-1
//!     uuid: 00000000-0000-4000-8000-000000000001
//!     tags: { tier: web }
//!     vnics: [{ name: web-1.0, mac: "02:00:00:00:00:01", ips: [10.0.1.11], zone: web }]
//! groups: { web: { tags: { tier: web } }, internet: external }
//! rules:
//!   datacenter:
//!     - { id: https-in, from: internet, to: web, service: tcp/443, action: allow }
//! "#);
//! let loaded = load(&src).unwrap();
//! assert!(!loaded.has_errors(), "{}", loaded.render());
//! let flow = Flow::to_service("8.8.8.8".parse().unwrap(), "10.0.1.11".parse().unwrap(), "tcp/443").unwrap();
//! let reference = evaluate(&loaded.model, &flow).unwrap();
//! let compiled = Compiler::new(loaded.model.clone()).unwrap().decide(&flow).unwrap();
//! assert_eq!(reference, compiled);
//! assert_eq!(&*reference.provenance[0].rule_id, "https-in");
//! ```

pub mod analyze;
pub mod chars;
pub mod compile;
pub mod diag;
pub mod eval;
pub mod limits;
pub mod load;
pub mod model;
pub mod source;
mod split;
pub mod validate;
pub mod yaml;

pub use diag::{Diagnostic, DiagnosticKind, Severity};
pub use load::{Loaded, load};
pub use model::Model;
pub use source::{DirSource, MemorySource, PolicySource};
