"""Federated planning (FednnU-Net style): ONE set of nnU-Net plans for every site, without pooling images.

``nnunetv2_fedkd plan SPEC [--plans-name nnUNetPlans] [--overwrite]`` (:func:`plan_federation`) runs five steps.
Everything that touches images runs at the site, on the site's own files; only fingerprint summaries travel.

1. **Site view datasets** (:func:`build_site_views`). Every site gets ``$nnUNet_raw/<view>``: its training cases in
   the federation's GLOBAL label set (background + ``[federation].labels``, label value = 1 + index), so one global
   model with the same output channels trains everywhere and stock nnU-Net tools work on every site. Labels are
   remapped with the code :func:`nnunetv2_fedkd.data.pooled.merge_sites` uses; images are hard-linked (copied
   where links are impossible), unchanged. dataset.json records under ``fedkd`` which organs the site annotates,
   per case (``case_annotated``, the table :class:`~nnunetv2_fedkd.data.label_availability.LabelAvailability` reads).
   The view's name is the site's ``federated_dataset`` in the spec, by default the site's dataset id + 100 and
   name + ``Fed`` (``Dataset501_SynthLiver`` -> ``Dataset601_SynthLiverFed``).
2. **Local fingerprints.** Stock ``nnUNetv2_extract_fingerprint -d <views> -np 2 --clean``; each site turns its
   ``dataset_fingerprint.json`` into a payload (:func:`site_fingerprint_payload`, written to
   ``$nnUNet_preprocessed/<view>/fedkd_fingerprint_payload.json``): per-case spacings and shapes after cropping, the
   median relative size after cropping, per-channel foreground intensity statistics and the sample counts exact
   pooling needs. Never voxels (:func:`validate_payload` refuses anything else).
3. **Merge** (:func:`merge_fingerprints`) into nnU-Net's ``dataset_fingerprint.json`` format, in the coordinator
   dataset (below).
4. **Plan once**: nnU-Net's ``ExperimentPlanner`` (or another stock planner, ``--planner``) on the merged fingerprint.
5. **Distribute**: stock ``move_plans_between_datasets`` copies the plans to every view (only ``dataset_name``
   changes), dataset.json is copied into each view's preprocessed folder, and every site preprocesses locally with
   stock ``nnUNetv2_preprocess -d <views> -plans_name NAME -c 3d_fullres -np 2``. Each site's plans are checked
   against the federation's digest (:func:`check_site_plans`), and the record (:func:`record_path`) is written last.

**The coordinator** is an nnU-Net dataset that holds no images: ``$nnUNet_raw/<plans dataset>/dataset.json`` (global
labels, the sites' channels, ``numTraining`` = all sites' cases, the image reader) and an empty ``imagesTr``;
``$nnUNet_preprocessed/<plans dataset>/`` holds the merged ``dataset_fingerprint.json``, the received payloads
(``site_fingerprints/<site>.json``), the plans and the federation record. The stock planner reads only dataset.json
and the fingerprint; it opens an image file for one thing only, to pick the reader/writer, and with dataset.json's
``overwrite_image_reader_writer`` set (as every dataset of this plugin has) the stock lookup returns that class
without reading the file. The planner run here is the stock class with exactly that method replaced by the lookup
without an example file (same class name, so the plans say ``"experiment_planner_used": "ExperimentPlanner"``).
The plans dataset is ``[federation].plans_dataset`` in the spec, by default
``Dataset{lowest view id - 1}_<Name>FedPlans`` (``Dataset600_SyntheticAbdomenFedPlans`` for views 601-604).

The modules: :mod:`.layout` (which datasets planning writes), :mod:`.views` (step 1), :mod:`.fingerprints` (steps 2-3;
**pooling the fingerprint**, what nnU-Net would compute on the pooled dataset from summaries only, is documented
there), :mod:`.record` (steps 4-5), :mod:`.plan` (:func:`plan_federation`), :mod:`.stock_steps` (nnU-Net's Python
API in a subprocess). Every public name is re-exported here.


Every error about the inputs (missing site dataset or labels, organs outside the global labels, an existing target
without ``--overwrite``, id clashes, bad label files) is raised before anything appears in the nnU-Net folders. This
module writes atomically (temporary folder or file, then rename); the view datasets appear all together or not at
all; the files the stock commands write
(fingerprints, plans, preprocessed data) are nnU-Net's own. The federation record
``$nnUNet_preprocessed/<plans dataset>/federation_<plans name>.json`` is written last (and removed first by
``--overwrite``), so its presence means that planning and preprocessing finished.
"""
from nnunetv2_fedkd.federated.planning.fingerprints import (  # noqa: F401
    CHANNEL_KEYS, INTENSITY_KEYS, NNUNET_FOREGROUND_SAMPLES, PAYLOAD_FILE, PAYLOAD_FORMAT, PAYLOAD_KEYS, PAYLOAD_VERSION,
    PayloadError, merge_fingerprints, site_fingerprint_payload, validate_payload)
from nnunetv2_fedkd.federated.planning.layout import (  # noqa: F401
    FederatedPlanningError, FederationLayout, resolve_layout)
from nnunetv2_fedkd.federated.planning.plan import plan_federation  # noqa: F401
from nnunetv2_fedkd.federated.planning.record import (  # noqa: F401
    RECORD_FORMAT, RECORD_VERSION, load_federation_record, planned_case_counts, record_path, verify_site_plans,
    write_coordinator_dataset)
from nnunetv2_fedkd.federated.planning.views import _write_site_view, build_site_views  # noqa: F401
from nnunetv2_fedkd.federated.site_side import (  # noqa: F401  (re-exported)
    PlansMismatch,
    check_site_plans,
    federation_plans_digest,
    normalized_plans,
)

__all__ = [
    "PAYLOAD_FORMAT", "PAYLOAD_KEYS", "CHANNEL_KEYS", "RECORD_FORMAT", "NNUNET_FOREGROUND_SAMPLES",
    "FederatedPlanningError", "PayloadError", "PlansMismatch", "FederationLayout", "resolve_layout",
    "build_site_views", "site_fingerprint_payload", "validate_payload", "merge_fingerprints",
    "write_coordinator_dataset", "normalized_plans", "federation_plans_digest", "check_site_plans", "record_path",
    "load_federation_record", "verify_site_plans", "plan_federation",
]
