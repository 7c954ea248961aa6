//! What an agent fetches and compiles: a [`PolicyBundle`] (the effective
//! policy's files and tag overlay, whole or as edits of the version held),
//! and the compilation of it, incremental when only tags changed.
//!
//! The controller compiles the same bundles to validate and to diff, so the
//! code lives here, where both ends find it without the other's.

use std::collections::BTreeMap;

use palisade_policy::compile::Compiler;
use palisade_policy::load::{Loaded, Loader};
use palisade_policy::source::SourceError;
use serde::{Deserialize, Serialize};

use crate::delta::{DeltaError, FilesDelta};
use crate::sources::{Files, TagOverlay};

/// What an agent fetches: everything needed to build its chains.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyBundle {
    /// Effective-policy revision.
    pub revision: u64,
    /// Policy version.
    pub version: u64,
    /// The version's files (empty when [`PolicyBundle::same_files`] is set).
    pub files: Files,
    /// The tag overlay to apply over the files' VM tags.
    pub tags: TagOverlay,
    /// The location overlay: VM → the host it runs on now, over the files'
    /// `host` (a VM moved by a live migration). Absent: none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub locations: BTreeMap<String, String>,
    /// The files were left out: the agent said it already has this version's
    /// files (`have=VERSION`), so only the revision and the overlay travel.
    /// A tag change thus costs the size of the overlay, not of the
    /// datacenter. Fill them in with [`PolicyBundle::resolve`].
    #[serde(default, skip_serializing_if = "core::ops::Not::not")]
    pub same_files: bool,
    /// The files were sent as edits of another version's, the one the agent
    /// said it holds (`have=VERSION`): a new version then costs about the
    /// size of what changed. `files` is empty; [`PolicyBundle::resolve`]
    /// applies the edits and checks the result's digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<FilesDelta>,
}

/// Building a [`PolicyBundle`]'s model failed.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The files do not load (a stored version always does; this means a corrupt bundle).
    #[error("policy does not load:\n{0}")]
    Invalid(String),
    /// The overlay names a VM the files do not have.
    #[error("tag overlay names VM \"{0}\", which the policy does not have")]
    UnknownVm(String),
    /// The location overlay names a VM the files do not have.
    #[error("location overlay places VM \"{0}\", which the policy does not have")]
    UnknownLocatedVm(String),
    /// The bundle was sent without its files and has not been resolved.
    #[error("bundle of version {0} was sent without its files; resolve it against the bundle held")]
    FilesOmitted(u64),
    /// A bundle sent as edits does not apply to the files held.
    #[error(transparent)]
    Delta(#[from] DeltaError),
    /// A bundle without files names another version than the one held.
    #[error("bundle was sent without its files for a holder of version {sent}, but the bundle held is version {have}")]
    WrongBase {
        /// The version the bundle's files are to come from.
        sent: u64,
        /// The version held.
        have: u64,
    },
}

impl PolicyBundle {
    /// Load the files and apply the tag overlay: the model the agent compiles.
    pub fn model(&self) -> Result<palisade_policy::Model, BundleError> {
        self.model_with(&mut Loader::new())
    }

    /// [`PolicyBundle::model`] with `loader`, which reuses what it built
    /// from the VMs of the bundle it loaded before (an agent keeps one
    /// from version to version: a new version that changes a few VMs then
    /// parses only those).
    pub fn model_with(&self, loader: &mut Loader) -> Result<palisade_policy::Model, BundleError> {
        if self.same_files || self.delta.is_some() {
            return Err(BundleError::FilesOmitted(self.version));
        }
        let mut model = effective_model_with(loader, &self.files, &self.tags)?;
        apply_locations(&mut model, &self.locations)?;
        Ok(model)
    }

    /// A bundle sent without its files or as edits, completed from `have`,
    /// the bundle the agent holds (which must be of the version it names);
    /// a bundle with its files is returned as it is.
    pub fn resolve(mut self, have: &PolicyBundle) -> Result<PolicyBundle, BundleError> {
        let base = match (&self.delta, self.same_files) {
            (Some(d), _) => d.base,
            (None, true) => self.version,
            (None, false) => return Ok(self),
        };
        if have.same_files || have.delta.is_some() || have.version != base {
            return Err(BundleError::WrongBase {
                sent: base,
                have: have.version,
            });
        }
        self.files = match self.delta.take() {
            Some(d) => d.apply(&have.files)?,
            None => have.files.clone(),
        };
        self.same_files = false;
        Ok(self)
    }
}

impl PolicyBundle {
    /// Compile this bundle's effective policy.
    pub fn compile(&self) -> Result<Compiler, BundleError> {
        self.compile_with(&mut Loader::new())
    }

    /// [`PolicyBundle::compile`], loading with `loader` ([`PolicyBundle::model_with`]).
    pub fn compile_with(&self, loader: &mut Loader) -> Result<Compiler, BundleError> {
        Compiler::new(self.model_with(loader)?).map_err(|e| BundleError::Invalid(e.to_string()))
    }

    /// Compile this bundle's effective policy from `compiled`, the compiled
    /// policy of `held`, the bundle it replaces (`None` when there is none).
    /// When only the overlays changed (same version, same files), the tag
    /// overlay only grew ([`overlay_grew`]) and the location overlay lost no
    /// VM ([`locations_kept`]), `compiled` is taken and brought to this
    /// bundle: only what the retagged VMs affect is recompiled
    /// ([`retag_changed`]), as the controller does, and the VMs a live
    /// migration moved are placed on their new hosts, which recompiles
    /// nothing ([`relocate_changed`]): at 50,000 VMs a whole compile takes
    /// a second or more, and every agent would pay it for each migration.
    /// Otherwise the bundle is compiled whole, loading with `loader`
    /// ([`PolicyBundle::model_with`]), and `compiled` is left for the caller
    /// to drop when it has time: freeing a compiled policy takes about as
    /// long as compiling one.
    pub fn compile_from(
        &self,
        held: &PolicyBundle,
        compiled: &mut Option<Compiler>,
        loader: &mut Loader,
    ) -> Result<Compiler, BundleError> {
        if self.same_files || self.delta.is_some() {
            return Err(BundleError::FilesOmitted(self.version));
        }
        let only_overlays = self.version != 0
            && self.version == held.version
            && !held.same_files
            && held.delta.is_none()
            && self.files == held.files
            && locations_kept(&held.locations, &self.locations)
            && overlay_grew(&held.tags, &self.tags);
        match compiled.take_if(|_| only_overlays) {
            Some(mut c) => {
                retag_changed(&mut c, &held.tags, &self.tags)?;
                relocate_changed(&mut c, &held.locations, &self.locations)?;
                Ok(c)
            }
            None => self.compile_with(loader),
        }
    }
}

/// Whether every VM the location overlay `held` places is still placed by
/// `next`. A VM left out goes back to the host its files give, which a
/// compiled policy no longer holds once relocated: that takes a whole
/// compile. (The controller only adds and moves entries within a version.)
pub fn locations_kept(held: &BTreeMap<String, String>, next: &BTreeMap<String, String>) -> bool {
    held.keys().all(|vm| next.contains_key(vm))
}

/// Bring `compiled`, the compiled effective policy under location overlay
/// `held`, to the one under `next` ([`locations_kept`] holds) by placing
/// each VM whose entry differs on its new host (`Compiler::relocate`: no
/// chain depends on a VM's host, so nothing is recompiled). On an error
/// `compiled` may be part-way: compile whole instead.
pub fn relocate_changed(
    compiled: &mut Compiler,
    held: &BTreeMap<String, String>,
    next: &BTreeMap<String, String>,
) -> Result<(), BundleError> {
    for (vm, host) in next {
        if held.get(vm) == Some(host) {
            continue;
        }
        compiled
            .relocate(vm, Some(host.clone()))
            .map_err(|_| BundleError::UnknownLocatedVm(vm.clone()))?;
    }
    Ok(())
}

/// Whether the effective tags under overlay `next` follow from those under
/// `held` by re-applying each VM's changed entry over its current effective
/// tags. That gives the same tags as applying the entry over the files' tags
/// exactly when every key of the old entry is still in the new one, and an
/// entry only grows as tags are set and removed (a removal is a `None`), so
/// this holds between two revisions of one version.
pub fn overlay_grew(held: &TagOverlay, next: &TagOverlay) -> bool {
    held.iter()
        .all(|(vm, old)| next.get(vm).is_some_and(|new| old.keys().all(|k| new.contains_key(k))))
}

/// Bring `compiled`, the compiled effective policy under overlay `held`, to
/// the one under `next` (the same files; [`overlay_grew`] holds) by
/// retagging each VM whose entry differs (`Compiler::retag`). On an error
/// `compiled` may be part-way: compile whole instead.
pub fn retag_changed(compiled: &mut Compiler, held: &TagOverlay, next: &TagOverlay) -> Result<(), BundleError> {
    for (vm, entry) in next {
        if held.get(vm) == Some(entry) {
            continue;
        }
        let Some(mut tags) = compiled.model().inventory.vm(vm).map(|v| v.tags.clone()) else {
            return Err(BundleError::UnknownVm(vm.clone()));
        };
        apply_overlay(&mut tags, entry);
        compiled
            .retag(vm, tags)
            .map_err(|e| BundleError::Invalid(e.to_string()))?;
    }
    Ok(())
}

/// Load `files` and apply `tags` over the VMs' tags.
pub fn effective_model(files: &Files, tags: &TagOverlay) -> Result<palisade_policy::Model, BundleError> {
    effective(|src| palisade_policy::load(src), files, tags)
}

/// [`effective_model`], loading with `loader` (see [`Loader`]).
pub fn effective_model_with(
    loader: &mut Loader,
    files: &Files,
    tags: &TagOverlay,
) -> Result<palisade_policy::Model, BundleError> {
    effective(|src| loader.load(src), files, tags)
}

fn effective(
    load: impl FnOnce(&palisade_policy::MemorySource) -> Result<Loaded, SourceError>,
    files: &Files,
    tags: &TagOverlay,
) -> Result<palisade_policy::Model, BundleError> {
    let src = files
        .iter()
        .fold(palisade_policy::MemorySource::new(), |s, (n, t)| s.with(n, t.clone()));
    // A memory source cannot fail to read.
    let loaded = load(&src).map_err(|e| BundleError::Invalid(e.to_string()))?;
    if loaded.has_errors() {
        return Err(BundleError::Invalid(loaded.render()));
    }
    let mut model = loaded.model;
    for (vm, overlay) in tags {
        let Some(v) = model.inventory.vms.iter_mut().find(|v| &v.name == vm) else {
            return Err(BundleError::UnknownVm(vm.clone()));
        };
        apply_overlay(&mut v.tags, overlay);
    }
    Ok(model)
}

/// Place each VM of `locations` on its host there (the location overlay
/// over the files' `host`); a VM the model does not have is refused.
pub fn apply_locations(
    model: &mut palisade_policy::Model,
    locations: &BTreeMap<String, String>,
) -> Result<(), BundleError> {
    for (vm, host) in locations {
        let Some(v) = model.inventory.vms.iter_mut().find(|v| &v.name == vm) else {
            return Err(BundleError::UnknownLocatedVm(vm.clone()));
        };
        v.host = Some(host.clone());
    }
    Ok(())
}

/// Apply one VM's overlay to its tags.
pub fn apply_overlay(tags: &mut BTreeMap<String, String>, overlay: &BTreeMap<String, Option<String>>) {
    for (k, v) in overlay {
        match v {
            Some(v) => tags.insert(k.clone(), v.clone()),
            None => tags.remove(k),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three VMs on `hv1` and `hv2` of a cluster, web and db tiers: web may
    /// reach db on tcp/5432, nothing else is allowed.
    fn files() -> Files {
        let mut inv = String::from(
            "datacenter: { name: dc, default: deny }\nclusters:\n  - name: c\n    hosts: [hv1, hv2, hv3]\n\
             zones: [{ name: z, vlan: 10 }]\nvms:\n",
        );
        for (i, (host, tier)) in [("hv1", "web"), ("hv1", "db"), ("hv2", "db")].iter().enumerate() {
            inv += &format!(
                "  - {{ name: vm{i}, uuid: 00000000-0000-4000-8000-{i:012x}, cluster: c, host: {host}, \
                 tags: {{ tier: {tier} }}, vnics: [{{ name: vm{i}.0, mac: \"02:00:00:00:00:0{i}\", \
                 ips: [10.0.0.{}], zone: z }}] }}\n",
                i + 1
            );
        }
        let policy = "version: 3\ngroups: { web: { tags: { tier: web } }, db: { tags: { tier: db } } }\n\
                      rules:\n  datacenter:\n    - { id: web-db, from: web, to: db, service: tcp/5432, action: allow }\n";
        [
            ("inventory.yaml".to_string(), inv),
            ("policy.yaml".to_string(), policy.to_string()),
        ]
        .into()
    }

    fn bundle(revision: u64, locations: &[(&str, &str)]) -> PolicyBundle {
        PolicyBundle {
            revision,
            version: 3,
            files: files(),
            tags: TagOverlay::new(),
            locations: locations.iter().map(|(v, h)| (v.to_string(), h.to_string())).collect(),
            same_files: false,
            delta: None,
        }
    }

    fn host_of(c: &Compiler, vm: &str) -> Option<String> {
        c.model().inventory.vm(vm).and_then(|v| v.host.clone())
    }

    /// What `next` compiled from `held`'s compiled policy gives, and
    /// whether the held policy was taken (brought along, not compiled whole).
    fn from_held(next: &PolicyBundle, held: &PolicyBundle) -> (Compiler, bool) {
        let mut compiled = Some(held.compile().unwrap());
        let got = next.compile_from(held, &mut compiled, &mut Loader::new()).unwrap();
        (got, compiled.is_none())
    }

    fn assert_same(got: &Compiler, whole: &Compiler) {
        assert_eq!(got.model(), whole.model(), "the models differ");
        assert!(got.chains().eq(whole.chains()), "the chains differ");
    }

    #[test]
    fn a_location_change_is_brought_along_and_equals_a_whole_compile() {
        let held = bundle(1, &[]);
        // A VM migrates: only the location overlay changes.
        let next = bundle(2, &[("vm1", "hv2")]);
        let (got, taken) = from_held(&next, &held);
        assert!(taken, "a location change does not compile the policy whole");
        assert_eq!(host_of(&got, "vm1").as_deref(), Some("hv2"));
        assert_same(&got, &next.compile().unwrap());
        // It moves on, another one moves, and a tag is set in the same revision.
        let mut after = bundle(3, &[("vm1", "hv3"), ("vm2", "hv1")]);
        after
            .tags
            .insert("vm0".into(), [("tier".to_string(), Some("db".to_string()))].into());
        let (got, taken) = from_held(&after, &next);
        assert!(taken);
        assert_eq!(
            (host_of(&got, "vm1").as_deref(), host_of(&got, "vm2").as_deref()),
            (Some("hv3"), Some("hv1"))
        );
        assert_same(&got, &after.compile().unwrap());
        // The same location as before: nothing to do, still the same result.
        let (got, taken) = from_held(&bundle(4, &[("vm1", "hv2")]), &next);
        assert!(taken);
        assert_same(&got, &next.compile().unwrap());
    }

    #[test]
    fn a_vm_left_out_of_the_location_overlay_is_compiled_whole_back_on_its_files_host() {
        let held = bundle(1, &[("vm1", "hv2"), ("vm2", "hv3")]);
        let next = bundle(2, &[("vm2", "hv3")]);
        let (got, taken) = from_held(&next, &held);
        assert!(!taken, "the files' host is not in the compiled policy: compiled whole");
        assert_eq!(host_of(&got, "vm1").as_deref(), Some("hv1"));
        assert_same(&got, &next.compile().unwrap());
        // Other changes still compile whole: another version.
        let mut other = bundle(3, &[("vm1", "hv2"), ("vm2", "hv3")]);
        other.version = 4;
        let (_, taken) = from_held(&other, &held);
        assert!(!taken);
    }

    #[test]
    fn a_location_for_a_vm_the_policy_does_not_have_is_refused_on_both_paths() {
        let held = bundle(1, &[]);
        let next = bundle(2, &[("ghost", "hv2")]);
        let mut compiled = Some(held.compile().unwrap());
        let e = next.compile_from(&held, &mut compiled, &mut Loader::new()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "location overlay places VM \"ghost\", which the policy does not have"
        );
        assert_eq!(next.compile().unwrap_err().to_string(), e.to_string());
    }
}
