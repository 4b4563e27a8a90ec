//! `mlxserver config setup | show | set | path`.

use std::fs;

use inquire::validator::Validation;
use inquire::{Confirm, CustomType, InquireError, Password, PasswordDisplayMode, Select, Text};

use super::{CliError, CliResult, ConfigCommand};
use crate::config::{self, mask_secret, Config};
use crate::i18n::{self, Lang};
use crate::{msg, t};

pub fn run(command: ConfigCommand) -> CliResult {
    match command {
        ConfigCommand::Setup => setup(),
        ConfigCommand::Show => show(),
        ConfigCommand::Set { key, value } => set(&key, &value),
        ConfigCommand::Path => {
            let home = config::home_dir()?;
            println!("{}", home.join(config::CONFIG_FILE).display());
            Ok(())
        }
    }
}

fn show() -> CliResult {
    let config = super::load_config()?;
    let path = config.config_path();
    let origin = if path.exists() { t!("config.show.file", path = path.display()) } else { t!("config.show.no_file") };
    println!("{origin}");
    for key in Config::keys() {
        let value = config.get(key).unwrap_or_default();
        let value = match key {
            "api_key" if !value.is_empty() => mask_secret(&value),
            _ if value.is_empty() => "-".to_string(),
            _ => value,
        };
        println!("{key} = {value}");
    }
    Ok(())
}

fn set(key: &str, value: &str) -> CliResult {
    let home = config::home_dir()?;
    let config = config::set_in_file(&home, key, value)?;
    let shown = match key {
        "api_key" if !value.trim().is_empty() => mask_secret(value.trim()),
        _ => config.get(key).unwrap_or_default(),
    };
    println!("{}", t!("config.set.done", key = key, value = shown));
    Ok(())
}

/// Maps inquire's outcomes to ours: Esc/Ctrl-C cancel without saving; no terminal is an
/// error that points to `config set`.
fn answer<T>(result: Result<T, InquireError>) -> Result<T, CliError> {
    match result {
        Ok(value) => Ok(value),
        Err(InquireError::OperationCanceled) | Err(InquireError::OperationInterrupted) => {
            Err(CliError(msg!("config.setup.cancelled")))
        }
        Err(InquireError::NotTTY) => Err(CliError(msg!("config.setup.not_a_terminal"))),
        Err(other) => Err(CliError(msg!("config.setup.failed", reason = other))),
    }
}

/// Checks that `value` names a folder we can create and write in.
fn writable_folder(value: &str) -> Result<(), String> {
    if value.trim().is_empty() {
        return Err(t!("config.setup.models_dir_empty"));
    }
    let path = config::expand_home(value);
    let probe = path.join(format!(".mlxserver-write-test-{}", std::process::id()));
    let outcome = fs::create_dir_all(&path).and_then(|_| fs::write(&probe, b"ok")).and_then(|_| fs::remove_file(&probe));
    outcome.map_err(|error| t!("config.setup.models_dir_unwritable", path = path.display(), reason = error))
}

fn setup() -> CliResult {
    let home = config::home_dir()?;
    let (mut config, _) = config::load_from(&home)?;
    println!("{}", t!("config.setup.welcome", path = home.join(config::CONFIG_FILE).display()));

    let languages = vec!["English (en)", "日本語 (ja)"];
    let start = if config.language == Lang::Ja { 1 } else { 0 };
    let choice = answer(
        Select::new(&t!("config.setup.language"), languages.clone())
            .with_starting_cursor(start)
            .with_help_message(&t!("config.setup.select_help"))
            .prompt(),
    )?;
    config.language = if choice == languages[1] { Lang::Ja } else { Lang::En };
    // The rest of the wizard speaks the language just chosen.
    i18n::set_language(config.language);

    let models_dir = answer(
        Text::new(&t!("config.setup.models_dir"))
            .with_default(&config.models_dir.display().to_string())
            .with_validator(|value: &str| {
                Ok(match writable_folder(value) {
                    Ok(()) => Validation::Valid,
                    Err(reason) => Validation::Invalid(reason.into()),
                })
            })
            .prompt(),
    )?;
    config.models_dir = config::expand_home(&models_dir);

    let host = answer(
        Text::new(&t!("config.setup.host"))
            .with_default(&config.host)
            .with_help_message(&t!("config.setup.host_help"))
            .with_validator(|value: &str| {
                Ok(if value.trim().is_empty() || value.contains(char::is_whitespace) {
                    Validation::Invalid(t!("config.setup.host_invalid").into())
                } else {
                    Validation::Valid
                })
            })
            .prompt(),
    )?;
    config.host = host.trim().to_string();

    let port = answer(
        CustomType::<u16>::new(&t!("config.setup.port"))
            .with_default(config.port)
            .with_error_message(&t!("config.setup.port_invalid"))
            .with_validator(|port: &u16| {
                Ok(if *port == 0 {
                    Validation::Invalid(t!("config.setup.port_invalid").into())
                } else {
                    Validation::Valid
                })
            })
            .prompt(),
    )?;
    config.port = port;

    config.api_key = ask_api_key(config.api_key.take())?;

    println!("{}", t!("config.setup.summary"));
    for key in ["language", "models_dir", "host", "port", "api_key"] {
        let value = config.get(key).unwrap_or_default();
        let value = match key {
            "api_key" if value.is_empty() => t!("config.setup.api_key_none"),
            "api_key" => mask_secret(&value),
            _ => value,
        };
        println!("  {key} = {value}");
    }
    let save = answer(Confirm::new(&t!("config.setup.confirm")).with_default(true).prompt())?;
    if !save {
        return Err(CliError(msg!("config.setup.cancelled")));
    }
    config::save(&config)?;
    println!("{}", t!("config.setup.saved", path = config.config_path().display()));
    Ok(())
}

fn ask_api_key(current: Option<String>) -> Result<Option<String>, CliError> {
    let none = t!("config.setup.api_key_choice_none");
    let keep = t!("config.setup.api_key_choice_keep");
    let enter = t!("config.setup.api_key_choice_enter");
    let generate = t!("config.setup.api_key_choice_generate");
    let mut options = vec![none.clone()];
    if current.is_some() {
        options.push(keep.clone());
    }
    options.push(enter.clone());
    options.push(generate.clone());
    let start = if current.is_some() { 1 } else { 0 };
    let choice = answer(
        Select::new(&t!("config.setup.api_key"), options)
            .with_starting_cursor(start)
            .with_help_message(&t!("config.setup.select_help"))
            .prompt(),
    )?;
    if choice == none {
        Ok(None)
    } else if choice == keep {
        Ok(current)
    } else if choice == generate {
        let key = generate_api_key();
        println!("{}", t!("config.setup.api_key_generated", key = key));
        Ok(Some(key))
    } else {
        let key = answer(
            Password::new(&t!("config.setup.api_key_enter"))
                .without_confirmation()
                .with_display_mode(PasswordDisplayMode::Masked)
                .with_validator(|value: &str| {
                    Ok(if value.trim().len() < 8 || value.contains(char::is_whitespace) {
                        Validation::Invalid(t!("config.setup.api_key_invalid").into())
                    } else {
                        Validation::Valid
                    })
                })
                .prompt(),
        )?;
        Ok(Some(key.trim().to_string()))
    }
}

fn generate_api_key() -> String {
    use rand::Rng;
    let bytes: [u8; 24] = rand::rng().random();
    format!("mlx-{}", hex::encode(bytes))
}
