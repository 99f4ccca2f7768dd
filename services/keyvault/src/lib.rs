//! trellis-keyvault
