//! Where the remote's credentials, region and endpoint come from, as the AWS CLI looks for them: the
//! environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`,
//! `AWS_ENDPOINT_URL`), then the profile (`AWS_PROFILE`, else `default`) in `~/.aws/credentials` and
//! `~/.aws/config` (or `AWS_SHARED_CREDENTIALS_FILE` / `AWS_CONFIG_FILE`).

use std::collections::HashMap;
use std::path::PathBuf;

use crate::error::{Error, Result};

pub struct Settings {
    pub region: String,
    /// A non-AWS endpoint (`http://127.0.0.1:9000`); None: AWS S3 itself.
    pub endpoint: Option<String>,
    /// (access key id, secret, session token); None: let the client ask the instance's metadata service.
    pub keys: Option<(String, String, Option<String>)>,
    keys_from: String,
}

impl Settings {
    pub fn from_env() -> Result<Settings> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
        let home = env("HOME").map(PathBuf::from).unwrap_or_default();
        let creds_file = env("AWS_SHARED_CREDENTIALS_FILE").map(PathBuf::from).unwrap_or(home.join(".aws/credentials"));
        let config_file = env("AWS_CONFIG_FILE").map(PathBuf::from).unwrap_or(home.join(".aws/config"));
        let creds = read_ini(&creds_file).remove(&profile).unwrap_or_default();
        // In the config file every profile but the default one is written `[profile NAME]`.
        let mut config = read_ini(&config_file);
        let config =
            config.remove(&format!("profile {profile}")).or_else(|| config.remove(&profile)).unwrap_or_default();
        let (keys, keys_from) = match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
            (Some(id), Some(secret)) => (Some((id, secret, env("AWS_SESSION_TOKEN"))), "from the environment".into()),
            _ => match (creds.get("aws_access_key_id"), creds.get("aws_secret_access_key")) {
                (Some(id), Some(secret)) => (
                    Some((id.clone(), secret.clone(), creds.get("aws_session_token").cloned())),
                    format!("profile `{profile}` of {}", creds_file.display()),
                ),
                _ => (None, "none found".into()),
            },
        };
        let endpoint = env("AWS_ENDPOINT_URL_S3")
            .or_else(|| env("AWS_ENDPOINT_URL"))
            .or_else(|| config.get("endpoint_url").cloned())
            .map(|e| e.trim_end_matches('/').to_string());
        if keys.is_none() && endpoint.is_some() {
            return Err(Error::env(format!(
                "no credentials for the remote at {}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or \
                 aws_access_key_id / aws_secret_access_key in profile `{profile}` of {}",
                endpoint.as_deref().unwrap_or(""),
                creds_file.display()
            )));
        }
        let region = env("AWS_REGION")
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .or_else(|| config.get("region").cloned())
            .unwrap_or_else(|| "us-east-1".into());
        Ok(Settings { region, endpoint, keys, keys_from })
    }

    /// Where the keys came from, for error messages (never the keys themselves).
    pub fn source_of_keys(&self) -> String {
        match &self.keys {
            Some((id, _, _)) => format!("access key `{id}`, {}", self.keys_from),
            None => self.keys_from.clone(),
        }
    }
}

/// The sections of an INI file as the AWS tools write it (`[name]`, `key = value`, `#`/`;` comments);
/// an unreadable or missing file has none.
fn read_ini(path: &std::path::Path) -> HashMap<String, HashMap<String, String>> {
    let mut sections: HashMap<String, HashMap<String, String>> = HashMap::new();
    let Ok(text) = std::fs::read_to_string(path) else { return sections };
    let mut current = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name.trim().to_string();
        } else if let Some((k, v)) = line.split_once('=') {
            sections.entry(current.clone()).or_default().insert(k.trim().to_lowercase(), v.trim().to_string());
        }
    }
    sections
}

#[cfg(test)]
mod tests {
    use super::read_ini;

    #[test]
    fn profiles_are_read_as_the_aws_cli_writes_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials");
        std::fs::write(
            &path,
            "# comment\n[default]\naws_access_key_id = AKIDEFAULT\naws_secret_access_key=s1\n\n\
             [profile lab]\nregion = eu-west-1\nAWS_ACCESS_KEY_ID = AKILAB\n",
        )
        .unwrap();
        let ini = read_ini(&path);
        assert_eq!(ini["default"]["aws_access_key_id"], "AKIDEFAULT");
        assert_eq!(ini["default"]["aws_secret_access_key"], "s1");
        assert_eq!(ini["profile lab"]["region"], "eu-west-1");
        assert_eq!(ini["profile lab"]["aws_access_key_id"], "AKILAB", "keys are case-insensitive");
        assert!(read_ini(&dir.path().join("absent")).is_empty());
    }
}
