//! SM2/SM3/SM4 primitives and the Yiqiao SM envelope.
