use crate::validate::fields_of;
