"""The math the analyses share, free of models and files: RDMs and their comparisons (:mod:`.rdm`), linear CKA
(:mod:`.cka`), the sensitivity estimators for noisy responses (:mod:`.estimators`), the linear category decoder
(:mod:`.decoder`) and one statistics convention (:mod:`.statistics`)."""
