"""fedge.demo: the oncology demo (Fed-TCGA-BRCA) and the in-process federation used for
federated cross-validation and for the local-only / pooled baselines."""
