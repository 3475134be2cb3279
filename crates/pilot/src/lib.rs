//! mizzen-pilot: the control-plane process (the istiod role).
