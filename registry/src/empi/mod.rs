//! Enterprise master patient index: matching engine (pure) and identity store.
