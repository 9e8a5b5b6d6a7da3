//! `--key value` flags for the test binaries (`meshapp`, `meshload`): a few typed values with
//! defaults, without a CLI framework in every pod's process.

use std::collections::HashMap;

/// Parsed `--key value` pairs.
#[derive(Debug, Default)]
pub struct Flags(HashMap<String, String>);

impl Flags {
    /// Parses `--key value` pairs; anything else is an error naming the argument.
    pub fn parse(args: &[String]) -> Result<Flags, String> {
        let mut map = HashMap::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let key = a
                .strip_prefix("--")
                .ok_or_else(|| format!("unexpected argument `{a}`"))?;
            let value = it.next().ok_or_else(|| format!("--{key} needs a value"))?;
            map.insert(key.to_string(), value.clone());
        }
        Ok(Flags(map))
    }

    /// The value of `--key` parsed as `T`, or `default`; required when `default` is `None`.
    pub fn get<T: std::str::FromStr>(&self, key: &str, default: Option<T>) -> Result<T, String>
    where
        T::Err: std::fmt::Display,
    {
        match self.0.get(key) {
            Some(v) => v.parse().map_err(|e| format!("--{key} `{v}`: {e}")),
            None => default.ok_or_else(|| format!("--{key} is required")),
        }
    }
}
